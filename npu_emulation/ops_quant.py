"""The int8 linear operators (aclnn, ``npu::``): ``npu_quantize``, ``npu_dynamic_quant``,
``npu_quant_matmul``, ``npu_weight_quant_batchmatmul``.

Each checks what torch_npu 2.13.0's ``_op_plugin_docs.py`` documents for Atlas A2/A3 (dtypes,
shapes, the supported argument combinations), then computes the documented formula exactly
(integer products in int64, scales in float64). Rounding of the quantize ops: half to even
(the documents give the formula only; confirm on a device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import contracts as c
from .calls import begin, maybe_oom, perturb

QUANTIZE_DOC = "torch_npu 2.13.0 _op_plugin_docs.py, npu_quantize"
DYNAMIC_DOC = "torch_npu 2.13.0 _op_plugin_docs.py, npu_dynamic_quant"
QMM_DOC = "torch_npu 2.13.0 _op_plugin_docs.py, npu_quant_matmul (表1, A2/A3 combinations)"
WQBMM_DOC = "torch_npu 2.13.0 _op_plugin_docs.py, npu_weight_quant_batchmatmul"

# ScalarType codes: an `int` dtype argument arrives as c10::ScalarType's number
SCALAR = {torch.int8: 1, torch.int32: 3, torch.float16: 5, torch.float32: 6, torch.qint8: 12,
          torch.quint8: 13, torch.bfloat16: 15, torch.quint4x2: 16}
CODE = {v: k for k, v in SCALAR.items()}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _dtype(value: int | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return CODE.get(int(value))


def _no_310p(op: str, family: str, src: str) -> None:
    if family == "310P":
        c.fail(op, "device", "the emulation models Atlas A2/A3 only for the int8 linear ops", src)


def npu_quantize(input: Tensor, scales: Tensor, zero_points: Tensor | None, dtype: int,
                 axis: int = 1, div_mode: bool = True) -> Tensor:
    op, src = "npu_quantize", QUANTIZE_DOC
    st = begin(op)
    _no_310p(op, st.settings.family, src)
    c.dtype_in(op, "input", input, FLOATS, src)
    out_dtype = _dtype(dtype)
    if out_dtype is not torch.qint8:
        c.fail(op, "dtype", f"{out_dtype or dtype}: the emulation supports torch.qint8 (int8 output)",
               src)
    if div_mode:
        c.fail(op, "div_mode", "True (divide by scales) is not emulated; the backend multiplies by "
               "the reciprocal (div_mode=False)", src)
    c.dtype_in(op, "scales", scales, FLOATS, src)
    if axis < -2 or axis >= input.dim():
        c.fail(op, "axis", f"{axis}: must be in [-2, input dims)", src)
    length = input.shape[-1] if axis > -2 else input.shape[-2]
    if scales.dim() != 1 or scales.shape[0] not in (1, length):
        c.fail(op, "scales", f"shape {tuple(scales.shape)}: 1-D of the quantized axis' size "
               f"{length} or 1", src)
    if zero_points is not None and (zero_points.shape != scales.shape
                                    or zero_points.dtype != scales.dtype):
        c.fail(op, "zero_points", f"{zero_points.dtype} {tuple(zero_points.shape)} must equal the "
               f"scales' dtype and shape (div_mode=False)", src)
    maybe_oom(st, op)
    x = input.double() * scales.double()
    if zero_points is not None:
        x = x + zero_points.double()
    return torch.round(x).clamp(-128, 127).to(torch.int8)


def npu_dynamic_quant(input: Tensor, *, smooth_scales: Tensor | None = None,
                      group_index: Tensor | None = None, dst_type: int | None = None,
                      quant_mode: str = "pertoken", dst_type_max: float = 0.0
                      ) -> tuple[Tensor, Tensor]:
    op, src = "npu_dynamic_quant", DYNAMIC_DOC
    st = begin(op)
    _no_310p(op, st.settings.family, src)
    c.dtype_in(op, "x", input, c.HALF, src)
    if input.dim() < 2:
        c.fail(op, "x", f"{input.dim()} dims: must be more than 1", src)
    if smooth_scales is not None or group_index is not None:
        c.fail(op, "smooth_scales/group_index", "not emulated (MoE / smoothing)", src)
    if _dtype(dst_type) not in (None, torch.int8):
        c.fail(op, "dst_type", f"{dst_type}: the emulation supports int8", src)
    if quant_mode != "pertoken":
        c.fail(op, "quant_mode", f"{quant_mode!r}: the emulation supports 'pertoken'", src)
    maybe_oom(st, op)
    x = input.double()
    scale = x.abs().amax(dim=-1) / 127  # scale = rowMax(abs(x)) / DTYPE_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(x / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return y, scale.float()


def npu_quant_matmul(x1: Tensor, x2: Tensor, scale: Tensor, *, offset: Tensor | None = None,
                     pertoken_scale: Tensor | None = None, bias: Tensor | None = None,
                     output_dtype: int | None = None, x1_dtype: int | None = None,
                     x2_dtype: int | None = None, pertoken_scale_dtype: int | None = None,
                     scale_dtype: int | None = None, group_sizes: list[int] | None = None,
                     y_scale: Tensor | None = None) -> Tensor:
    op, src = "npu_quant_matmul", QMM_DOC
    st = begin(op)
    _no_310p(op, st.settings.family, src)
    out = _dtype(output_dtype) or torch.int8
    for name, t in (("x1", x1), ("x2", x2)):
        c.dtype_in(op, name, t, (torch.int8,), src)
        if not 2 <= t.dim() <= 6:
            c.fail(op, name, f"{t.dim()} dims: 2-6 are supported", src)
    if x1.dim() != 2 or x2.dim() != 2:
        c.fail(op, "x1/x2", "the emulation covers the 2-D (M, K) x (K, N) case", src)
    (m, k), (k2, n) = x1.shape, x2.shape
    if k != k2:
        c.fail(op, "x2", f"shape {tuple(x2.shape)}: K = {k2} differs from x1's {k}", src)
    if k > 65535 or n > 65535:
        c.fail(op, "x1/x2", "the last dims must not exceed 65535", src)
    if scale.dim() != 1 or scale.shape[0] not in (1, n):
        c.fail(op, "scale", f"shape {tuple(scale.shape)}: 1-D (t,), t = 1 or n = {n}", src)
    if any(v is not None for v in (offset, x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype,
                                   group_sizes, y_scale)):
        c.fail(op, "offset/x1_dtype/...", "not emulated (int8 output, int4 or grouped cases)", src)
    if pertoken_scale is not None:
        c.dtype_in(op, "pertoken_scale", pertoken_scale, (torch.float32,), src)
        if tuple(pertoken_scale.shape) != (m,):
            c.fail(op, "pertoken_scale", f"shape {tuple(pertoken_scale.shape)}: must be ({m},)", src)
    # the A2/A3 combinations of 表1 with a float output
    if out == torch.float16:
        allowed_scale = (torch.float32,) if pertoken_scale is not None else (torch.int64, torch.float32)
        allowed_bias = ((torch.int32, torch.float16, torch.float32) if pertoken_scale is not None
                        else (torch.int32,))
    elif out == torch.bfloat16:
        allowed_scale, allowed_bias = (torch.float32, torch.bfloat16), (
            torch.int32, torch.bfloat16, torch.float32)
    else:
        c.fail(op, "output_dtype", f"{out}: the emulation covers float16 and bfloat16 outputs", src)
    c.dtype_in(op, "scale", scale, allowed_scale, src)
    if scale.dtype == torch.int64:
        c.fail(op, "scale", "int64 (npu_trans_quant_param) scales are not emulated", src)
    if bias is not None:
        c.dtype_in(op, "bias", bias, allowed_bias, src)
        if bias.dim() not in (1, 2) or bias.shape[-1] != n or bias.numel() != n:
            c.fail(op, "bias", f"shape {tuple(bias.shape)}: (n,) or (1, n) with n = {n}", src)
    maybe_oom(st, op)
    acc = x1.to(torch.int64) @ x2.to(torch.int64)  # exact
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.reshape(-1).to(torch.int64)
    y = acc.double() * scale.double()
    if pertoken_scale is not None:
        y = y * pertoken_scale.double().unsqueeze(-1)
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.reshape(-1).double()
    result = y.to(out)
    perturb(st, op, result)
    return result


def npu_weight_quant_batchmatmul(x: Tensor, weight: Tensor, antiquant_scale: Tensor,
                                 antiquant_offset: Tensor | None = None,
                                 quant_scale: Tensor | None = None,
                                 quant_offset: Tensor | None = None, bias: Tensor | None = None,
                                 antiquant_group_size: int = 0, inner_precise: int = 0,
                                 weight_dtype: int | None = None) -> Tensor:
    op, src = "npu_weight_quant_batchmatmul", WQBMM_DOC
    st = begin(op)
    _no_310p(op, st.settings.family, src)
    c.dtype_in(op, "x", x, c.HALF, src)
    c.dtype_in(op, "weight", weight, (torch.int8,), src)
    if x.dim() != 2 or weight.dim() != 2:
        c.fail(op, "x/weight", "2-D (M, K) and (K, N) are supported", src)
    (_, k), (k2, n) = x.shape, weight.shape
    if k != k2 or not (1 <= k <= 65535 and 1 <= n <= 65535):
        c.fail(op, "weight", f"shape {tuple(weight.shape)} against x {tuple(x.shape)}: (K, N), "
               "K and N in [1, 65535]", src)
    if antiquant_scale.dtype != x.dtype:
        c.fail(op, "antiquant_scale", f"dtype {antiquant_scale.dtype} must equal x's {x.dtype}",
               src)
    if antiquant_group_size:
        if antiquant_group_size % 32 or not 32 <= antiquant_group_size <= k - 1:
            c.fail(op, "antiquant_group_size", f"{antiquant_group_size}: a multiple of 32 in "
                   f"[32, K - 1 = {k - 1}]", src)
        groups = -(-k // antiquant_group_size)
        shapes = {(groups, n)}
    else:
        shapes = {(n,), (1, n), (1,), (1, 1)}
    if tuple(antiquant_scale.shape) not in shapes:
        c.fail(op, "antiquant_scale", f"shape {tuple(antiquant_scale.shape)}: one of "
               f"{sorted(shapes)}", src)
    if antiquant_offset is not None and (antiquant_offset.shape != antiquant_scale.shape
                                         or antiquant_offset.dtype != antiquant_scale.dtype):
        c.fail(op, "antiquant_offset", "must have antiquant_scale's shape and dtype", src)
    if quant_scale is not None or quant_offset is not None or weight_dtype is not None:
        c.fail(op, "quant_scale/quant_offset/weight_dtype", "not emulated (int8 output, int4)",
               src)
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        if bias.dtype != want or bias.numel() != n:
            c.fail(op, "bias", f"{bias.dtype} {tuple(bias.shape)}: {want} (n,) for x {x.dtype}", src)
    maybe_oom(st, op)
    w = weight.double()  # [K, N]
    scale = antiquant_scale.double().reshape(-1, n)  # [G or 1, N]
    off = None if antiquant_offset is None else antiquant_offset.double().reshape(-1, n)
    rows = antiquant_group_size or k
    idx = torch.arange(k) // rows  # the group of each row of the weight
    if off is not None:
        w = w + off[idx.clamp(max=off.shape[0] - 1)]
    w = w * scale[idx.clamp(max=scale.shape[0] - 1)]  # (weight + offset) * scale
    y = x.double() @ w
    if bias is not None:
        y = y + bias.double().reshape(-1)
    result = y.to(x.dtype)
    perturb(st, op, result)
    return result
