"""The test oracle: every scheme computed in float64 from dequantized weights and fake-quantized
activations, as the formats document them. Slow; never the serving path."""

from __future__ import annotations

import torch
from torch import Tensor

from .int8 import dequantize_weight, quantize_per_token, quantize_static
from .tensors import Int8Linear

name = "reference"


def prepare(t: Int8Linear) -> None:
    """Nothing to repack."""


def matmul(x: Tensor, t: Int8Linear, add_qbias: bool = True) -> Tensor:
    """``[M, K] -> [M, N]`` in ``x.dtype`` (no float bias: the linear adds it)."""
    q = t.weight_nk()
    if t.activations == "static":
        return _static(x, t, q, add_qbias).to(x.dtype)
    w = dequantize_weight(q, t.w_scale, t.w_offset)  # [N, K] float64
    if t.activations == "none":
        return (x.double() @ w.T).to(x.dtype)
    x_q, scale = quantize_per_token(x)
    return ((x_q.double() * scale.double().unsqueeze(-1)) @ w.T).to(x.dtype)


def _static(x: Tensor, t: Int8Linear, q: Tensor, add_qbias: bool) -> Tensor:
    outs, start = [], 0
    for p, rows in enumerate(t.part_rows):
        stop = start + rows
        x_q = quantize_static(x, float(t.in_scale[p]), float(t.in_offset[p]))
        acc = x_q.double() @ q[start:stop].double().T  # exact integers in float64
        if add_qbias and t.qbias is not None:
            acc = acc + t.qbias[start:stop].double()
        outs.append(acc * t.deq_scale[start:stop].double())
        start = stop
    return torch.cat(outs, dim=-1)
