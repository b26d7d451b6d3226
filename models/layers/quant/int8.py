"""Int8 arithmetic every scheme shares: weight quantization (``--quantize eetq``), activation
quantization (per-token dynamic, per-tensor static), dequantization, unpacking.

Conventions (one for all formats, converted to at load time):
* weights ``q`` int8 ``[N, K]``; ``scale`` float32 ``[N, G]`` (G = 1: one scale per output
  channel, else K / G columns per group); optional ``offset`` float32 ``[N, G]``;
  ``w = (q - offset) * scale``.
* static activations: ``x_q = clamp(round(x / s + o), -128, 127)``, ``x = (x_q - o) * s``
  (msModelSlim's documented formula; compressed-tensors' with zero point ``o``).
* dynamic activations: one symmetric scale per token, ``absmax / 127``.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MIN, INT8_MAX = -128, 127


def quantize_weight_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8, one scale per output row: ``scale = absmax / 127`` (what TGI's
    ``--quantize eetq`` does); ``[N, K]`` float -> ``q [N, K]`` int8, ``scale [N, 1]`` float32.
    An all-zero row gets scale 1 (its values are 0 either way)."""
    w = w.float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    q = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic int8, one scale per row of ``x [M, K]`` (``absmax / 127``):
    -> ``x_q [M, K]`` int8, ``scale [M]`` float32. The formula of torch_npu's
    ``npu_dynamic_quant`` (scale = rowMax(|x|) / 127, y = round(x / scale))."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(INT8_MIN, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_static(x: Tensor, scale: float, offset: float) -> Tensor:
    """``clamp(round(x / scale + offset), -128, 127)`` as int8 (per-tensor scale and offset)."""
    xf = x.float() / scale
    if offset:
        xf = xf + offset
    return torch.round(xf).clamp_(INT8_MIN, INT8_MAX).to(torch.int8)


def dequantize_weight(q: Tensor, scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """``(q - offset) * scale`` as float64 ``[N, K]``; ``scale``/``offset`` ``[N, G]``."""
    n, k = q.shape
    groups = scale.shape[1]
    w = q.double().view(n, groups, k // groups)
    if offset is not None:
        w = w - offset.double().unsqueeze(-1)
    return (w * scale.double().unsqueeze(-1)).view(n, k)


def unpack_int32_int8(packed: Tensor, columns: int) -> Tensor:
    """compressed-tensors ``pack-quantized`` 8-bit weights: four values per int32, element ``i``
    of a row in bits ``8 * (i % 4)`` of word ``i // 4``, each stored as ``value + 128``
    (compressed_tensors.compressors.pack_quantized.helpers.pack_to_int32); ``[N, ceil(K / 4)]``
    int32 -> ``[N, columns]`` int8."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, not {packed.dtype}")
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & 0xFF  # [N, W, 4], arithmetic shift masked
    values = values.reshape(packed.shape[0], -1)[:, :columns] - 128
    return values.to(torch.int8).contiguous()


def pack_int8_int32(q: Tensor) -> Tensor:
    """The inverse of ``unpack_int32_int8`` (tests and the msModelSlim/compressed-tensors
    writers use it); ``[N, K]`` int8 with K % 4 == 0."""
    n, k = q.shape
    if k % 4:
        raise ValueError(f"{k} columns: packing needs a multiple of 4")
    u = (q.to(torch.int32) + 128).view(n, k // 4, 4)
    shifts = torch.arange(0, 32, 8, dtype=torch.int32)
    return (u << shifts).sum(dim=-1, dtype=torch.int32)


def int64_to_float32_bits(deq_scale: Tensor) -> Tensor:
    """msModelSlim's ``deq_scale`` for float16 models: each float32 value's bits, read as an
    int32 and widened to int64 (msModelSlim's ``deqscale_process``); -> float32."""
    if deq_scale.dtype != torch.int64:
        return deq_scale.float()
    low = (deq_scale & 0xFFFFFFFF).to(torch.int64)
    low = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)
    return low.view(torch.float32)


def float32_to_int64_bits(values: Tensor) -> Tensor:
    """The inverse of ``int64_to_float32_bits`` (the fp16 form msModelSlim writes)."""
    return values.float().contiguous().view(torch.int32).to(torch.int64)
