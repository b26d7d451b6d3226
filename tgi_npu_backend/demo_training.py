"""A TOY demo model that writes something readable: a tiny BLOOM (or Gemma) trained, for a fixed
number of steps, on this package's own Python source.

``write_trained_checkpoint`` is what ``tgi-npu-demo-checkpoint`` runs. Everything that decides the
weights (the recipe below, the corpus bytes, the torch and transformers versions) goes into a
cache key; a checkpoint trained once is kept in the user cache and copied from there afterwards.
Training is seeded: the same key on the same machine gives the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .user_cache import cache_home

CACHE_ENV = "TGI_NPU_DEMO_CACHE"
STAMP = "demo-recipe.json"  # written last: a directory without it is incomplete


@dataclass(frozen=True)
class Recipe:
    """What decides the trained weights (besides the corpus and library versions)."""

    arch: str = "bloom"
    seed: int = 0
    steps: int = 200
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1e-2
    warmup_steps: int = 20


def corpus_files() -> list[Path]:
    """This package's top-level Python modules (shipped with every install), sorted by name."""
    return sorted(Path(__file__).parent.glob("*.py"))


def read_corpus(files: list[Path] | None = None) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in (corpus_files() if files is None else files)]


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return cache_home() / "demo"


def recipe_key(recipe: Recipe, corpus: list[str]) -> str:
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    for lib in (torch, transformers, tokenizers):
        h.update(f"{lib.__name__}={lib.__version__};".encode())
    for text in corpus:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:16]


def model_config(recipe: Recipe) -> dict:
    from .demo import bloom_config, gemma_config

    if recipe.arch == "bloom":
        return bloom_config(
            recipe.vocab_size, hidden_size=recipe.hidden_size, n_layer=recipe.num_layers,
            n_head=recipe.num_heads, initializer_range=0.02,
        )
    if recipe.arch == "gemma":
        head_dim = recipe.hidden_size // recipe.num_heads
        return gemma_config(
            recipe.vocab_size, hidden_size=recipe.hidden_size,
            intermediate_size=2 * recipe.hidden_size, num_hidden_layers=recipe.num_layers,
            num_attention_heads=recipe.num_heads, num_key_value_heads=1, head_dim=head_dim,
            max_position_embeddings=2048, initializer_range=0.02,
        )
    raise ValueError(f"unknown demo architecture {recipe.arch!r}: use 'bloom' or 'gemma'")


def _token_stream(tokenizer, corpus: list[str]):
    import torch

    ids: list[int] = []
    for text in corpus:
        # NOTE: the tokenizers object directly: transformers warns about texts over
        # model_max_length, which whole source files are; training cuts windows from them.
        ids.extend(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    return torch.tensor(ids, dtype=torch.long)


def train(model, data, recipe: Recipe, progress: bool = True) -> list[float]:
    """AdamW with linear warmup then cosine decay on random windows of ``data``; returns the
    loss of every step."""
    import torch
    from tqdm.auto import tqdm

    if len(data) <= recipe.seq_len + 1:
        raise ValueError(f"the corpus has {len(data)} tokens; training needs more than {recipe.seq_len + 1}")
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    model.train()
    losses = []
    bar = tqdm(
        range(recipe.steps), desc=f"training the toy {recipe.arch}", unit="step",
        disable=not progress, file=sys.stderr,
    )
    for step in bar:
        warm = min(1.0, (step + 1) / recipe.warmup_steps)
        lr = recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - recipe.seq_len - 1, (recipe.batch_size,), generator=gen)
        x = torch.stack([data[s : s + recipe.seq_len] for s in starts.tolist()])  # [B, S]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.2f}")
    model.eval()
    return losses


def _train_into(path: Path, recipe: Recipe, corpus: list[str], key: str, progress: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .demo import save_weights, write_model_files

    cfg = model_config(recipe)
    tokenizer = write_model_files(path, recipe.arch, cfg, corpus=corpus)
    data = _token_stream(tokenizer, corpus)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    losses = train(model, data, recipe, progress)
    save_weights(path, recipe.arch, model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    (path / "README.md").write_text(
        f"# Toy demo {recipe.arch} checkpoint (NOT a useful language model)\n\n"
        f"A {n_params / 1e6:.1f}M-parameter {recipe.arch} trained by `tgi-npu-demo-checkpoint` for "
        f"{recipe.steps} steps ({recipe.steps * recipe.batch_size * recipe.seq_len} tokens) on the "
        f"Python source of the tgi_npu_backend package ({len(data)} tokens). It continues code-like "
        "text such as `def main():`; it knows nothing else. Its purpose is to show the server "
        f"working.\n\nTraining loss: {losses[0]:.2f} at the first step, {losses[-1]:.2f} at the last.\n"
    )
    stamp = {"key": key, "recipe": asdict(recipe), "corpus_tokens": len(data),
             "parameters": n_params, "first_loss": losses[0], "last_loss": losses[-1]}
    (path / STAMP).write_text(json.dumps(stamp, indent=2))


def read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / STAMP).read_text())
    except (OSError, ValueError):
        return None


def write_trained_checkpoint(
    path: str | Path,
    recipe: Recipe = Recipe(),
    *,
    corpus: list[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[Path, bool]:
    """Write the toy checkpoint to ``path``; returns (path, trained_now). Trains only when
    neither ``path`` nor the cache holds a checkpoint of this recipe and corpus."""
    path = Path(path)
    corpus = read_corpus() if corpus is None else corpus
    key = recipe_key(recipe, corpus)
    if (read_stamp(path) or {}).get("key") == key:
        return path, False
    cached = cache_root() / f"{recipe.arch}-{key}"
    trained = False
    if not use_cache or (read_stamp(cached) or {}).get("key") != key:
        source_parent = cache_root() if use_cache else path.parent
        source_parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{recipe.arch}-{key}-", dir=source_parent))
        try:
            _train_into(work, recipe, corpus, key, progress)
            if not use_cache:
                _copy_checkpoint(work, path)
                return path, True
            if cached.exists():  # an incomplete one from an interrupted run
                shutil.rmtree(cached)
            os.replace(work, cached)
        finally:
            if work.exists():
                shutil.rmtree(work)
        trained = True
    _copy_checkpoint(cached, path)
    return path, trained


def _copy_checkpoint(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / STAMP).unlink(missing_ok=True)
    for f in sorted(src.iterdir()):
        if f.name != STAMP:
            shutil.copy2(f, dst / f.name)
    shutil.copy2(src / STAMP, dst / STAMP)  # last: marks dst complete


def with_overrides(recipe: Recipe, **overrides) -> Recipe:
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
