"""Load a (quantized) tiny model on the CPU and run one prompt through it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from tgi_npu_backend.kernels import AttentionMetadata, Phase, get_backend
from tgi_npu_backend.models.base import CausalLM
from tgi_npu_backend.models.layers.quant import detect
from tgi_npu_backend.models.registry import load_model
from torch import Tensor

from tgi_npu_backend.distributed import ParallelContext

CPU = torch.device("cpu")
BLOCK = 16


def load(model_dir: Path, quantize: str | None = None, ops: str = "cpu",
         parallel: ParallelContext = ParallelContext(), dtype=torch.float32) -> CausalLM:
    quant = detect(model_dir, quantize)
    if quant is not None:
        quant = replace(quant, ops=ops)
    return load_model(model_dir, dtype=dtype, device=CPU, backend=get_backend(CPU),
                      parallel=parallel, quant=quant)


def quantized_linears(model: CausalLM) -> list:
    return [m for m in model.modules() if getattr(m, "method", None) is not None]


def use_ops(model: CausalLM, ops: str) -> None:
    for lin in quantized_linears(model):
        lin.method.use_ops(lin, ops)


def prompt_logits(model: CausalLM, ids: list[int]) -> Tensor:
    """[len(ids), vocab] float32 logits of one prefill pass."""
    n = len(ids)
    blocks = list(range(1, 1 + (n + BLOCK - 1) // BLOCK))
    caches = [
        model.backend.allocate_kv_cache(len(blocks) + 1, BLOCK, model.num_kv_heads,
                                        model.head_dim, model.dtype, CPU)
        for _ in range(model.num_layers)
    ]
    meta = AttentionMetadata.build(
        phase=Phase.PREFILL, slot_mapping=[blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)],
        block_tables=[blocks], context_lens=[0], query_lens=[n], block_size=BLOCK, device=CPU,
    )
    with torch.inference_mode():
        meta = model.backend.prepare(meta)
        hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)
        return model.compute_logits(hidden).float()


def prompt_ids(vocab_size: int, n: int = 24, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()
