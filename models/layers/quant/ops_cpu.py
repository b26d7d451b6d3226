"""CPU int8 kernels: ``torch._weight_int8pack_mm`` (W8A16) and ``torch._int_mm`` (W8A8).

NOTE: measured here (torch 2.13, one thread of the AVX-512 (BF16, VNNI) CPU, a 4096x1024 weight):
``_weight_int8pack_mm`` takes 0.30 ms at batch 1 with bfloat16 activations against 1.45 ms for
the float32 oneDNN linear, but 7.7 ms with float32 activations (313 ms at batch 32), so W8A16
runs its matmul in bfloat16 whatever the model dtype, with the float32 scales applied after the
int8 product; ``_int_mm(x_q, w.t())`` on the [N, K] weight takes 0.10 / 1.9 ms at batch 1 / 32
(0.63 / 3.4 ms with a [K, N] contiguous copy), so the weight stays [N, K].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .int8 import quantize_per_token, quantize_static
from .tensors import Int8Linear

name = "cpu"
COMPUTE = torch.bfloat16  # W8A16 activations (see the NOTE)


def prepare(t: Int8Linear) -> None:
    """Per-group W8A16: store the weight group-major ([G, N, K/G], each block contiguous: the
    kernel takes contiguous weights only) and keep one unit-scale vector for the kernel."""
    n = t.out_features
    t.extra["ones"] = torch.ones(n, dtype=COMPUTE, device=t.qweight.device)
    if t.activations == "none" and t.group_size is not None and not t.group_major:
        g = t.w_scale.shape[1]
        t.qweight = t.qweight.view(n, g, t.group_size).permute(1, 0, 2).contiguous()
        t.group_major = True


def matmul(x: Tensor, t: Int8Linear, add_qbias: bool = True) -> Tensor:
    """``[M, K] -> [M, N]`` in ``x.dtype`` (no float bias: the linear adds it)."""
    if t.activations == "none":
        return _w8a16(x, t).to(x.dtype)
    if t.activations == "dynamic":
        x_q, scale = quantize_per_token(x)
        acc = torch._int_mm(x_q, t.qweight.t())  # [M, N] int32
        return (acc.float() * scale.unsqueeze(-1) * t.w_scale[:, 0]).to(x.dtype)
    outs, start = [], 0
    for p, rows in enumerate(t.part_rows):
        stop = start + rows
        x_q = quantize_static(x, float(t.in_scale[p]), float(t.in_offset[p]))
        acc = torch._int_mm(x_q, t.qweight[start:stop].t())
        if add_qbias and t.qbias is not None:
            acc = acc + t.qbias[start:stop]
        outs.append(acc.float() * t.deq_scale[start:stop])
        start = stop
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return out.to(x.dtype)


def _w8a16(x: Tensor, t: Int8Linear) -> Tensor:
    xb = x.to(COMPUTE).contiguous()  # NOTE: a strided A crashes the kernel (torch 2.13)
    ones = t.extra["ones"]
    if not t.group_major:
        out = torch._weight_int8pack_mm(xb, t.qweight, ones).float() * t.w_scale[:, 0]
    else:
        gs = t.group_size
        out = None
        for g in range(t.qweight.shape[0]):
            part = torch._weight_int8pack_mm(xb[:, g * gs : (g + 1) * gs].contiguous(),
                                             t.qweight[g], ones).float() * t.w_scale[:, g]
            out = part if out is None else out + part
    if t.w_offset is not None:
        # (q - o) * s: subtract x's per-group column sums times o * s
        g = t.w_scale.shape[1]
        sums = xb.float().view(x.shape[0], g, -1).sum(-1)  # [M, G]
        out = out - sums @ (t.w_offset * t.w_scale).T
    return out
