"""NPU int8 linear kernels (torch_npu 2.13.0), the NPU side of the quantization seam
(``models/layers/quant``: ``prepare(t)``, ``matmul(x, t, add_qbias)``).

* W8A16: ``npu_weight_quant_batchmatmul(x, weight [K, N], antiquant_scale, antiquant_offset)``
  computes ``x @ ((weight + offset) * scale)``: the offset is stored negated (msModelSlim's
  ``(weight - weight_offset) * weight_scale``; its docs: "npu量化算子计算时实际的逻辑为
  (weight + weight_offset) * weight_scale"), scales in the activation dtype, per-channel
  ``[N]`` or per-group ``[K / group, N]`` with ``antiquant_group_size``. The weight is passed as
  the transpose of the [N, K] tensor (what the op's doc recommends per channel).
* W8A8 dynamic: ``npu_dynamic_quant(x)`` (per-token int8 + float32 scales), then
  ``npu_quant_matmul(x_q, weight.t(), weight_scale, pertoken_scale=..., output_dtype=x.dtype)``.
* W8A8 static: ``npu_quantize(x, 1 / input_scale, input_offset, torch.qint8, -1, False)`` (as
  vllm-ascend's static W8A8 method: reciprocal scale and offset repeated over K, multiply mode),
  then ``npu_quant_matmul(x_q, weight.t(), deq_scale, bias=quant_bias, output_dtype=x.dtype)``
  (float32 ``deq_scale``: accepted with float16 and bfloat16 outputs on A2/A3).
"""

from __future__ import annotations

import torch
from tgi_npu_backend.models.layers.quant.tensors import Int8Linear
from torch import Tensor

name = "npu"


def prepare(t: Int8Linear) -> None:
    """Nothing to repack ahead of the first call; per-dtype scale copies are made then."""


def _cached(t: Int8Linear, key: str, make) -> Tensor:
    if key not in t.extra:
        t.extra[key] = make()
    return t.extra[key]


def matmul(x: Tensor, t: Int8Linear, add_qbias: bool = True) -> Tensor:
    """``[M, K] -> [M, N]`` in ``x.dtype`` (float16/bfloat16; no float bias)."""
    import torch_npu

    dt = x.dtype
    if t.activations == "none":
        per_group = t.w_scale.shape[1] > 1
        # [N] per channel, [G, N] per group, in the activation dtype (the op's contract)
        scale = _cached(t, f"antiquant_scale_{dt}", lambda: (
            t.w_scale.T.contiguous() if per_group else t.w_scale[:, 0].contiguous()).to(dt))
        offset = None
        if t.w_offset is not None:
            offset = _cached(t, f"antiquant_offset_{dt}", lambda: (
                -(t.w_offset.T.contiguous() if per_group else t.w_offset[:, 0])).to(dt))
        return torch_npu.npu_weight_quant_batchmatmul(
            x, t.qweight.t(), scale, antiquant_offset=offset,
            antiquant_group_size=t.group_size or 0,
        )
    if t.activations == "dynamic":
        x_q, pertoken = torch_npu.npu_dynamic_quant(x.contiguous())
        scale = _cached(t, "w_scale_1d", lambda: t.w_scale[:, 0].float().contiguous())
        return torch_npu.npu_quant_matmul(
            x_q, t.qweight.t(), scale, pertoken_scale=pertoken, output_dtype=dt
        )
    outs, start = [], 0
    k = t.qweight.shape[1]
    for p, rows in enumerate(t.part_rows):
        stop = start + rows
        inv = _cached(t, f"in_scale_inv_{p}_{dt}",
                      lambda p=p: (1.0 / t.in_scale[p:p + 1].double()).repeat(k).to(dt))
        off = _cached(t, f"in_offset_{p}_{dt}", lambda p=p: t.in_offset[p:p + 1].repeat(k).to(dt))
        x_q = torch_npu.npu_quantize(x, inv, off, torch.qint8, -1, False)
        bias = t.qbias[start:stop] if add_qbias and t.qbias is not None else None
        outs.append(torch_npu.npu_quant_matmul(
            x_q, t.qweight[start:stop].t(), t.deq_scale[start:stop], bias=bias, output_dtype=dt
        ))
        start = stop
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
