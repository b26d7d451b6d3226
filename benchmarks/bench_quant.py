"""Quantized decode on this CPU: weight bytes and decode tokens/s at batch 1 and 32 for float32,
W8A16 and W8A8, on the bloom-560m shape (random weights), all in one run so the ratios compare
like with like.

    python benchmarks/bench_quant.py [--model-dir DIR] [--steps 16] [--batches 1 32] [--threads N]

* float32: the float checkpoint as served (oneDNN float32 linears, packed at load).
* W8A16: ``--quantize eetq`` (int8 per-channel weights quantized at load;
  ``torch._weight_int8pack_mm`` on bfloat16 activations), the model in float32.
* W8A8: the same int8 weights with dynamic per-token int8 activations (``torch._int_mm``): the
  tensors and kernels a compressed-tensors W8A8 (dynamic) checkpoint runs with.
* bfloat16: the float checkpoint with ``--dtype bfloat16`` (oneDNN bfloat16 linears and LM head,
  packed at load; the tied LM head as a packed copy): the unquantized 16-bit baseline.
* W8A16 bf16: ``--quantize eetq --dtype bfloat16``, W8A16 as its name says (16-bit activations
  everywhere, the int8 kernel fed without conversions, the packed bfloat16 LM head).

Embeddings and the LM head (250,880 x 1,024) stay float in every mode, as in TGI: float32 in the
float32 modes, bfloat16 in the bfloat16 ones; the decoder-block linears alone are timed as well.
The shard's model runs directly (one prefill of 16 tokens per sequence, then timed decode steps
of the whole model with its paged KV cache and greedy argmax); no gRPC.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from tgi_npu_backend.kernels import AttentionMetadata, Phase, get_backend
from tgi_npu_backend.models.layers.quant import QuantConfig, detect
from tgi_npu_backend.models.layers.quant.methods import weight_bytes
from tgi_npu_backend.models.layers.quant.scheme import LinearScheme, SchemeGroup
from tgi_npu_backend.models.registry import load_model

BLOOM_560M = {"vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16}
CPU = torch.device("cpu")
BLOCK = 16
PROMPT = 16


def ensure_checkpoint(model_dir: Path) -> Path:
    cfg_path = model_dir / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if all(cfg.get(k) == v for k, v in BLOOM_560M.items()):
            return model_dir
    from tgi_npu_backend.demo import write_checkpoint

    print(f"writing a random-weight bloom-560m-shaped checkpoint to {model_dir} ...", flush=True)
    return write_checkpoint(model_dir, "bloom", seed=0, **BLOOM_560M)


MODES = {  # label: (model dtype, quantization)
    "float32": (torch.float32, None),
    "W8A16": (torch.float32, "W8A16"),
    "W8A8": (torch.float32, "W8A8"),
    "bfloat16": (torch.bfloat16, None),
    "W8A16 bf16": (torch.bfloat16, "W8A16"),
}


def quant_for(mode: str | None, model_dir: Path) -> QuantConfig | None:
    if mode is None:
        return None
    if mode == "W8A16":
        return detect(model_dir, "eetq")
    # W8A8: eetq's int8 weights with dynamic per-token activations (compressed-tensors W8A8)
    return QuantConfig("eetq", groups=(SchemeGroup(("Linear",), LinearScheme("eetq", "dynamic")),))


def linear_bytes(model) -> int:
    total = 0
    for m in model.modules():
        if getattr(m, "method", None) is not None:
            total += m.method.int8.nbytes()
        elif type(m).__name__.endswith("ParallelLinear") and getattr(m, "weight", None) is not None:
            total += sum(p.numel() * p.element_size() for p in m.parameters())
    return total


def decode_rate(model, batch: int, steps: int) -> tuple[float, float]:
    """(tokens/s of whole decode steps, seconds per step spent in the LM head)."""
    backend = model.backend
    blocks_per_seq = (PROMPT + steps + BLOCK) // BLOCK + 1
    caches = [backend.allocate_kv_cache(batch * blocks_per_seq + 1, BLOCK, model.num_kv_heads,
                                        model.head_dim, model.dtype, CPU)
              for _ in range(model.num_layers)]
    tables = [[1 + s * blocks_per_seq + b for b in range(blocks_per_seq)] for s in range(batch)]
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(3, model.config.vocab_size, (PROMPT,), generator=g).tolist()
              for _ in range(batch)]

    def slot(s: int, p: int) -> int:
        return tables[s][p // BLOCK] * BLOCK + p % BLOCK

    def forward(ids, pos, meta, last):
        meta = backend.prepare(meta)
        hidden = model(torch.tensor(ids), torch.tensor(pos), caches, meta)
        return model.compute_logits(hidden[last]).argmax(-1).tolist()

    with torch.inference_mode():
        ids = [t for seq in tokens for t in seq]
        pos = [p for _ in range(batch) for p in range(PROMPT)]
        meta = AttentionMetadata.build(
            phase=Phase.PREFILL, slot_mapping=[slot(s, p) for s in range(batch) for p in range(PROMPT)],
            block_tables=tables, context_lens=[0] * batch, query_lens=[PROMPT] * batch,
            block_size=BLOCK, device=CPU)
        last = torch.arange(1, batch + 1) * PROMPT - 1
        for s, t in enumerate(forward(ids, pos, meta, last)):
            tokens[s].append(t)
        start = time.perf_counter()
        for _ in range(steps):
            n = len(tokens[0])
            meta = AttentionMetadata.build(
                phase=Phase.DECODE, slot_mapping=[slot(s, n - 1) for s in range(batch)],
                block_tables=tables, context_lens=[n - 1] * batch, query_lens=[1] * batch,
                block_size=BLOCK, device=CPU)
            chosen = forward([t[-1] for t in tokens], [n - 1] * batch, meta, torch.arange(batch))
            for s, t in enumerate(chosen):
                tokens[s].append(t)
        elapsed = time.perf_counter() - start
        hidden = torch.randn(batch, model.config.hidden_size, dtype=model.dtype)
        model.compute_logits(hidden)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.compute_logits(hidden)
        head = (time.perf_counter() - t0) / steps
    return batch * steps / elapsed, head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "tgi-npu-bench-bloom560m")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); on a shared, loaded machine 1 thread "
                   "avoids measuring the threads' waits for each other instead of the kernels")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = ensure_checkpoint(args.model_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average before: {os.getloadavg()}", flush=True)
    rows = {}
    for mode, (dtype, scheme) in MODES.items():
        model = load_model(model_dir, dtype=dtype, device=CPU, backend=get_backend(CPU),
                           quant=quant_for(scheme, model_dir))
        row = {"weights": weight_bytes(model), "linears": linear_bytes(model)}
        for b in args.batches:
            rate, head = decode_rate(model, b, args.steps)
            blocks = b / (b / rate - head)  # tokens/s of the decoder blocks alone
            row[b] = (rate, blocks)
            print(f"{mode:10s} batch {b:3d}: {rate:8.1f} tok/s (decoder blocks without the LM "
                  f"head: {blocks:8.1f} tok/s; LM head {head * 1e3:.1f} ms/step)", flush=True)
        rows[mode] = row
        del model
    print(f"load average after: {os.getloadavg()}")
    print("\nmode        weights MiB  block linears MiB  " + "  ".join(
        f"b{b} tok/s (x fp32)  blocks-only (x fp32)" for b in args.batches))
    base = rows["float32"]
    for mode, row in rows.items():
        cells = []
        for b in args.batches:
            rate, blocks = row[b]
            cells.append(f"{rate:7.1f} ({rate / base[b][0]:4.2f}x)     "
                         f"{blocks:7.1f} ({blocks / base[b][1]:4.2f}x)")
        print(f"{mode:10s} {row['weights'] / 2**20:11.1f}  {row['linears'] / 2**20:17.1f}  "
              + "  ".join(cells))
    for b in args.batches:
        w8, half = rows["W8A16 bf16"][b][0], rows["bfloat16"][b][0]
        print(f"batch {b}: W8A16 (bfloat16 model) {w8 / base[b][0]:.2f}x float32 (goal at batch 1: "
              f">= 2x), {w8 / half:.2f}x the unquantized bfloat16 model")


if __name__ == "__main__":
    main()
