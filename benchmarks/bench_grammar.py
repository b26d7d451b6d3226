"""Grammar masking's share of a decode step (issue 9; a script, not a test).

The model is the bloom-560m shape (24 layers, hidden 1024, 16 heads, 250,880 logits) with random
weights (``tgi_npu_backend.demo.write_checkpoint``, as benchmarks/bench_throughput.py) and a
tokenizer of 250,680 tokens (``wide_tokenizer``: BLOOM's tokenizer size, so the grammar engine
works on a realistic vocabulary; the tests' trained tokenizer has 512). The shard runs in this
process (``build_generator``), driven as the router drives it (``tests/router_sim.py``).

For each batch size (default 1, 8, 32), every request carries a grammar (the ``GRAMMARS`` below,
in turn) and the batch decodes ``--steps`` steps; the time spent in grammar code (the batched
mask: host bits + device expansion + masked_fill, and the per-request state advance) is summed
per Decode and divided by that Decode's wall time. The same batch without grammars is timed
too, so the step-time difference is printed beside the share. Goal (issue 9): under 10% at
batch 32.

    python benchmarks/bench_grammar.py                       # batch 1, 8, 32
    python benchmarks/bench_grammar.py --batch 32 --steps 8 --model-dir /tmp/bloom560m-grammar
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "active"],
    "additionalProperties": False,
}
# kind, value: a nested schema, and regexes (a date/time, an IPv4 address, an enum-like choice)
GRAMMARS = {
    "json": ("json", json.dumps(PERSON)),
    "date": ("regex", r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T[0-2][0-9]:[0-5][0-9]"),
    "ipv4": ("regex", r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"),
    "choice": ("regex", r"(yes|no|maybe)( because [a-z ]{1,20})?"),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to 256+."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def wide_tokenizer(size: int = 250880, specials=("<unk>", "<s>", "</s>", "<pad>")):
    """A byte-level BPE tokenizer with ``size`` tokens (BLOOM's vocabulary is 250,880), in a
    second: each word of the Python standard library's text (most frequent first, with and
    without its leading space) becomes a token through left-to-right merges of its prefixes.
    What the grammar engines see is realistic (a quarter million distinct byte strings, word
    pieces, punctuation runs, whitespace runs); the merge order is not a trained BPE's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    to_char = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab.setdefault(to_char[b], len(vocab))
    merges: list[tuple[str, str]] = []
    counts: collections.Counter = collections.Counter()
    stdlib = os.path.dirname(os.__file__)
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8", errors="ignore") as f:
            counts.update(re.findall(r" ?\w+| ?[^\w\s]+|\s+", f.read()))
        if len(counts) > 2 * size:
            break
    for word, _ in counts.most_common():
        text = "".join(to_char[b] for b in word.encode())
        prefix = text[0]
        for ch in text[1:]:
            if len(vocab) >= size:
                break
            if prefix + ch not in vocab:
                vocab[prefix + ch] = len(vocab)
                merges.append((prefix, ch))
            prefix += ch
        if len(vocab) >= size:
            break
    if len(vocab) < size:
        raise RuntimeError(f"the standard library's text gave only {len(vocab)} tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=specials[0], bos_token=specials[1],
        eos_token=specials[2], pad_token=specials[3],
    )


BLOOM_560M = {"vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16}
TOKENIZER_SIZE = 250680  # bigscience/bloom's tokenizer; the model pads its logits to 250,880
PROMPT = "Fill in the form for the next customer, as JSON: name, age, address and the rest."


def ensure_checkpoint(model_dir: Path) -> Path:
    """The bloom-560m-shaped random checkpoint with the wide tokenizer, written once."""
    marker = model_dir / "wide_tokenizer.txt"
    if marker.exists():
        return model_dir
    from tgi_npu_backend.demo import write_checkpoint

    print(f"writing a random-weight bloom-560m-shaped checkpoint to {model_dir} ...", flush=True)
    write_checkpoint(model_dir, "bloom", seed=0, **BLOOM_560M)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    wide_tokenizer(TOKENIZER_SIZE).save_pretrained(model_dir)
    marker.write_text(f"tokenizer: bench_grammar.wide_tokenizer({TOKENIZER_SIZE})\n")
    return model_dir


class GrammarClock:
    """Sums the time spent in grammar code (mask and advance) while installed."""

    def __init__(self):
        from tgi_npu_backend.grammar import GrammarMasks, GrammarState

        self.seconds = 0.0
        self._patches = [(GrammarMasks, "__call__"), (GrammarState, "advance")]
        self._saved = [getattr(c, n) for c, n in self._patches]
        for (cls, name), original in zip(self._patches, self._saved):
            setattr(cls, name, self._timed(original))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper

    def close(self) -> None:
        for (cls, name), original in zip(self._patches, self._saved):
            setattr(cls, name, original)


def run(shard, sim, batch: int, steps: int, grammar: bool, clock: GrammarClock | None):
    """Prefill ``batch`` requests, decode ``steps`` steps; per-Decode (wall s, grammar s)."""
    from router_sim import plain

    from tgi_npu_backend.pb import generate_pb2 as pb

    kinds = {"json": pb.GRAMMAR_TYPE_JSON, "regex": pb.GRAMMAR_TYPE_REGEX}
    grammars = list(GRAMMARS.values())
    requests = []
    for i in range(batch):
        kind, value = grammars[i % len(grammars)]
        extra = dict(grammar=value, grammar_type=kinds[kind]) if grammar else {}
        # sampled, so requests of one grammar differ; EOS ignored so the batch stays whole
        requests.append(sim.request(PROMPT, max_new_tokens=steps + 2, do_sample=True, seed=i,
                                    ignore_eos=not grammar, **extra))
    step = shard.prefill(*plain(sim.batch(requests)))
    out = []
    for _ in range(steps):
        if step.batch is None or step.batch.size < batch:
            break  # a grammar ended a request: the batch is no longer ``batch`` wide
        live = [g.request_id for g in step.generations if g.generated_text is None]
        if len(live) < batch:
            break
        before = clock.seconds if clock else 0.0
        start = time.perf_counter()
        step = shard.decode([step.batch.id])
        out.append((time.perf_counter() - start, (clock.seconds - before) if clock else 0.0))
    shard.clear(None)
    for r in requests:
        sim.release(r.id)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=10, help="decode steps per batch size")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "bloom560m-grammar")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from router_sim import RouterSim, batch_requests
    from transformers import AutoTokenizer

    from tgi_npu_backend.config import ServerConfig
    from tgi_npu_backend.launcher.allocator import BlockAllocator
    from tgi_npu_backend.load import build_generator

    model_dir = ensure_checkpoint(args.model_dir)
    print(f"load average before: {os.getloadavg()}  torch threads: {torch.get_num_threads()}", flush=True)
    config = ServerConfig.from_cli(model_id=str(model_dir), env={"TGI_NPU_KV_CACHE_FRACTION": "0.05"})
    shard = build_generator(config)
    sim = RouterSim("unused", AutoTokenizer.from_pretrained(model_dir, truncation_side="left"))
    # a small warmup: it only sizes the KV pool here (a 4096-token prefill of this model takes
    # minutes on two CPU cores)
    warm = sim.warmup_request(None, None, 256, None)
    supported, sim.max_input, sim.max_total = shard.warmup(batch_requests(warm.batch), None, 256, None)
    sim.allocator = BlockAllocator(supported, shard.block_size)

    # compile each grammar once (cached per type+value+tokenizer, as in serving)
    run(shard, sim, len(GRAMMARS), 1, grammar=True, clock=None)
    print(f"{'batch':>5} {'steps':>5} {'step free':>10} {'step grammar':>13} {'grammar code':>13} "
          f"{'share':>6} {'step diff':>10}")
    for batch in args.batch:
        free = run(shard, sim, batch, args.steps, grammar=False, clock=None)
        clock = GrammarClock()
        try:
            constrained = run(shard, sim, batch, args.steps, grammar=True, clock=clock)
        finally:
            clock.close()
        if not constrained:
            print(f"{batch:>5} a grammar request ended at once; no full-width decode step measured")
            continue
        free_s = statistics.median(w for w, _ in free)
        step_s = statistics.median(w for w, _ in constrained)
        grammar_s = statistics.median(g for _, g in constrained)
        print(f"{batch:>5} {len(constrained):>5} {free_s * 1e3:>8.1f}ms {step_s * 1e3:>11.1f}ms "
              f"{grammar_s * 1e3:>11.2f}ms {grammar_s / step_s:>6.1%} {(step_s - free_s) * 1e3:>+8.1f}ms",
              flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
