"""Tiny BLOOM and Gemma checkpoints with a locally trained byte-level BPE tokenizer.

``write_checkpoint`` writes random weights: the tests use it (the model hub is unreachable here);
the text they produce is meaningless, but deterministic, and HF transformers produces the same
tokens (the oracle). ``tgi-npu-demo-checkpoint`` (``main``) writes the toy model of
``demo_training`` by default, trained so that the README's run command shows readable output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Local training text: English, French, code, and multi-byte scripts so that byte-level BPE
# produces tokens that split UTF-8 characters (exercises incremental detokenization).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pour déguster un ortolan, il faut tout d'abord le faire fondre à la casserole.",
    "Text generation inference serves large language models over gRPC and HTTP.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "深度学习模型在昇腾处理器上运行。你好，世界！",
    "Ascend NPU paged attention with ALiBi for BLOOM and rotary embeddings for Gemma.",
    "Emoji: 🙂 🚀 ✨ — naïve café résumé, Ελληνικά, русский язык, 日本語のテキスト。",
    "Once upon a time there was a little model that generated tokens one by one.",
    "_test _test _test liveness health check warmup batch prefill decode filter clear",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation !?.,;:()[]{}",
]

BLOOM_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
BLOOM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def train_tokenizer(
    vocab_size: int, specials: list[str], add_bos: str | None, corpus: list[str] | None = None
):
    """A byte-level BPE tokenizer (GPT-2/BLOOM style) trained on ``corpus`` (default ``CORPUS``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS if corpus is None else corpus, trainer=trainer)
    if add_bos is not None:
        bos_id = tok.token_to_id(add_bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{add_bos} $A", pair=f"{add_bos} $A $B", special_tokens=[(add_bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def bloom_config(vocab_size: int, **overrides) -> dict:
    cfg = dict(
        architectures=["BloomForCausalLM"],
        model_type="bloom",
        vocab_size=vocab_size,
        hidden_size=64,
        n_layer=2,
        n_head=4,
        layer_norm_epsilon=1e-5,
        initializer_range=0.5,
        apply_residual_connection_post_layernorm=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype="float32",
        use_cache=True,
    )
    cfg.update(overrides)
    return cfg


def gemma_config(vocab_size: int, **overrides) -> dict:
    cfg = dict(
        architectures=["GemmaForCausalLM"],
        model_type="gemma",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,  # NOTE: deliberately != hidden_size / num_attention_heads, as in Gemma-7B
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=0.5,
        attention_bias=False,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        torch_dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def write_model_files(path: Path, arch: str, cfg: dict, corpus: list[str] | None = None):
    """Tokenizer (trained on ``corpus``, default ``CORPUS``), config.json and
    generation_config.json; returns the tokenizer (``PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    if arch == "bloom":
        specials, bos, template = BLOOM_SPECIALS, None, BLOOM_CHAT_TEMPLATE
        tok_kwargs = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    elif arch == "gemma":
        specials, bos, template = GEMMA_SPECIALS, "<bos>", GEMMA_CHAT_TEMPLATE
        tok_kwargs = dict(unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    else:
        raise ValueError(f"unknown demo architecture {arch!r}: use 'bloom' or 'gemma'")
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(cfg["vocab_size"], specials, bos, corpus)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **tok_kwargs)
    fast.model_max_length = 2048
    fast.save_pretrained(path)

    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    if arch == "gemma":
        # Instruction-tuned Gemma stops on <end_of_turn> too.
        gen["eos_token_id"] = [cfg["eos_token_id"], tok.token_to_id("<end_of_turn>")]
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return fast


def save_weights(
    path: Path,
    arch: str,
    state: dict,
    *,
    dtype: str = "float32",
    strip_prefix: bool = False,
    with_lm_head: bool = False,
) -> None:
    """``model.safetensors`` from an HF model's state dict, tied weights stored once."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in state.items()}
    # Tied weights: save the embedding once, as the published checkpoints do.
    state.pop("lm_head.weight", None)
    if arch == "bloom" and strip_prefix:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    if with_lm_head:
        emb = "model.embed_tokens.weight" if arch == "gemma" else (
            "word_embeddings.weight" if strip_prefix else "transformer.word_embeddings.weight"
        )
        state["lm_head.weight"] = state[emb].clone()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def write_checkpoint(
    path: str | Path,
    arch: str = "bloom",
    *,
    vocab_size: int = 512,
    seed: int = 0,
    strip_prefix: bool = False,
    with_lm_head: bool = False,
    dtype: str = "float32",
    **config_overrides,
) -> Path:
    """Write a random-weight checkpoint directory that ``text-generation-server serve`` accepts.

    ``strip_prefix`` writes BLOOM keys without ``transformer.`` (the bigscience/bloom-560m
    naming); ``with_lm_head`` adds an explicit (tied) ``lm_head.weight``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if arch == "bloom":
        cfg = bloom_config(vocab_size, **config_overrides)
    elif arch == "gemma":
        cfg = gemma_config(vocab_size, **config_overrides)
    else:
        raise ValueError(f"unknown demo architecture {arch!r}: use 'bloom' or 'gemma'")
    write_model_files(path, arch, cfg)

    torch.manual_seed(seed)
    hf_config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    save_weights(
        path, arch, model.state_dict(), dtype=dtype, strip_prefix=strip_prefix,
        with_lm_head=with_lm_head,
    )
    (path / "README.md").write_text(
        f"# Demo {arch} checkpoint\n\nRANDOM WEIGHTS, written by tgi_npu_backend.demo for tests "
        "and demos. Its output is meaningless text.\n"
    )
    return path


def main(argv: list[str] | None = None) -> None:
    from .demo_training import (
        CACHE_ENV,
        Recipe,
        cache_root,
        read_stamp,
        with_overrides,
        write_trained_checkpoint,
    )

    parser = argparse.ArgumentParser(
        prog="tgi-npu-demo-checkpoint",
        description="Write a tiny TOY checkpoint to serve without the model hub: by default a small "
        "BLOOM (or Gemma) trained for a fixed number of steps (about a minute or two on two CPU "
        "cores) on this package's own Python source, so it continues code such as `def main():` "
        "with code-like text. Training is seeded; the result is cached in "
        f"{cache_root()} (env {CACHE_ENV}) and copied from there next time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("path", help="output directory")
    parser.add_argument("--arch", choices=["bloom", "gemma"], default="bloom")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=Recipe.steps, help="training steps")
    parser.add_argument(
        "--random", action="store_true",
        help="write random weights instead (meaningless output; what the tests use)",
    )
    parser.add_argument("--no-cache", action="store_true", help="train even if a cached copy exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    if args.random:
        out = write_checkpoint(args.path, args.arch, seed=args.seed)
        print(f"wrote a random-weight {args.arch} checkpoint (meaningless output) to {out}")
        return
    recipe = with_overrides(Recipe(), arch=args.arch, seed=args.seed, steps=args.steps)
    out, trained = write_trained_checkpoint(
        args.path, recipe, use_cache=not args.no_cache, progress=not args.quiet
    )
    stamp = read_stamp(out) or {}
    how = "trained" if trained else "copied from the cache"
    print(
        f"wrote a TOY {args.arch} checkpoint ({stamp.get('parameters', 0) / 1e6:.1f}M parameters, "
        f"{how}; training loss {stamp.get('first_loss', float('nan')):.2f} -> "
        f"{stamp.get('last_loss', float('nan')):.2f}) to {out}"
    )


if __name__ == "__main__":
    main()
