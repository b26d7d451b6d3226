"""Load a (quantized) tiny model on the CPU; ``prompt_logits`` (``tests/prompt_pass.py``) runs one
prompt through it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from prompt_pass import CPU, prompt_logits  # noqa: F401 (re-exported to the tests here)
from tgi_npu_backend.kernels import get_backend
from tgi_npu_backend.models.base import CausalLM
from tgi_npu_backend.models.layers.quant import detect
from tgi_npu_backend.models.registry import load_model

from tgi_npu_backend.distributed import ParallelContext


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


def prompt_ids(vocab_size: int, n: int = 24, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()
