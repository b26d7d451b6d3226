"""The aclnn (``npu::``) operators: ``npu_rms_norm``, ``npu_add_rms_norm``, ``npu_rotary_mul``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import contracts as c
from . import oracle
from .calls import begin, maybe_oom, nan_fill, perturb

NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _norm_checks(op: str, x: Tensor, gamma: Tensor, family: str, dims: tuple[int, int],
                 src: str) -> None:
    c.dtype_in(op, "input" if op == "npu_rms_norm" else "x1", x, NORM_DTYPES, src)
    if gamma.dtype != x.dtype:
        c.fail(op, "gamma", f"dtype {gamma.dtype} must equal the input's {x.dtype}", src)
    c.soc_dtype(op, "input", x, family)
    if not dims[0] <= x.dim() <= dims[1]:
        c.fail(op, "input", f"has {x.dim()} dims; {dims[0]}-{dims[1]} are supported", src)
    if gamma.dim() == 0 or gamma.dim() > x.dim() \
            or tuple(x.shape[x.dim() - gamma.dim():]) != tuple(gamma.shape):
        c.fail(op, "gamma", f"shape {tuple(gamma.shape)} must equal the trailing dims of the input "
               f"{tuple(x.shape)} (the normalized dims)", src)


def _rstd_shape(x: Tensor, gamma: Tensor) -> tuple[int, ...]:
    keep = x.dim() - gamma.dim()
    return tuple(x.shape[:keep]) + (1,) * gamma.dim()


def npu_rms_norm(input: Tensor, gamma: Tensor, epsilon: float = 1e-06) -> tuple[Tensor, Tensor]:  # noqa: A002
    op = "npu_rms_norm"
    st = begin(op)
    _norm_checks(op, input, gamma, st.settings.family, (2, 8), c.RMS_DOC + " (参数说明: 2-8维)")
    maybe_oom(st, op)
    y = torch.empty_like(input)
    rstd = torch.empty(_rstd_shape(input, gamma), dtype=torch.float32)
    nan_fill(y, rstd)
    y64, rstd64 = oracle.rms_norm(input, gamma, epsilon)
    y.copy_(y64)
    rstd.copy_(rstd64.reshape(rstd.shape))
    perturb(st, op, y)
    return y, rstd


def npu_add_rms_norm(x1: Tensor, x2: Tensor, gamma: Tensor,
                     epsilon: float = 1e-06) -> tuple[Tensor, Tensor, Tensor]:
    op = "npu_add_rms_norm"
    st = begin(op)
    src = c.ADD_RMS_DOC
    if x2.dtype != x1.dtype or tuple(x2.shape) != tuple(x1.shape):
        c.fail(op, "x2", f"{x2.dtype} {tuple(x2.shape)} must match x1's {x1.dtype} "
               f"{tuple(x1.shape)}", src)
    _norm_checks(op, x1, gamma, st.settings.family, (1, 8), src)
    maybe_oom(st, op)
    y, x = torch.empty_like(x1), torch.empty_like(x1)
    rstd = torch.empty(_rstd_shape(x1, gamma), dtype=torch.float32)
    nan_fill(y, rstd, x)
    # x = x1 + x2 in the input dtype (the kernel's xOut); the norm reads that sum
    x.copy_(x1.to(torch.float64) + x2.to(torch.float64))
    y64, rstd64 = oracle.rms_norm(x, gamma, epsilon)
    y.copy_(y64)
    rstd.copy_(rstd64.reshape(rstd.shape))
    perturb(st, op, y)
    return y, rstd, x


def npu_rotary_mul(input: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half",  # noqa: A002
                   rotate: Tensor | None = None) -> Tensor:
    op = "npu_rotary_mul"
    st = begin(op)
    src = c.ROTARY_DOC
    if st.settings.family == "310P":
        c.fail(op, "input", "on 310P (Atlas inference series) npu_rotary_mul is documented only in "
               "jit_compile=True mode with D = 128; the emulation models the default "
               "jit_compile=False, documented for Atlas A2/A3 only", src)
    if rotary_mode not in ("half", "interleave"):
        c.fail(op, "rotary_mode", f"{rotary_mode!r}: 'half' or 'interleave'", src)
    for name, t in (("input", input), ("r1", r1), ("r2", r2)):
        c.dtype_in(op, name, t, NORM_DTYPES, src)
        if t.dim() != 4:
            c.fail(op, name, f"shape {tuple(t.shape)}: a 4-D tensor is required", src)
    for name, t in (("r1", r1), ("r2", r2)):
        if t.dtype != input.dtype:
            c.fail(op, name, f"dtype {t.dtype} differs from the input's {input.dtype} (confirm on a "
                   "device: the doc lists the same three dtypes for all inputs)", src)
    a, b, s, d = input.shape
    if d % 2 or d >= 896:
        c.fail(op, "input", f"D = {d}: must be even and < 896", src)
    if rotary_mode == "half":
        layouts = {"BNSD": {(1, 1, s, d), (a, 1, s, d), (a, b, s, d)},
                   "BSND": {(1, b, 1, d), (a, b, 1, d), (a, b, s, d)},
                   "SBND": {(a, 1, 1, d), (a, b, 1, d), (a, b, s, d)}}
    else:
        layouts = {"BNSD": {(1, 1, s, d)}, "BSND": {(1, b, 1, d)}, "SBND": {(a, 1, 1, d)}}
    fits = [lay for lay, shapes in layouts.items() if tuple(r1.shape) in shapes]
    if not fits or tuple(r2.shape) != tuple(r1.shape):
        c.fail(op, "r1/r2", f"shapes {tuple(r1.shape)}/{tuple(r2.shape)} do not match any documented "
               f"broadcast of input {tuple(input.shape)} for {rotary_mode} mode (BNSD: 11SD/B1SD/BNSD,"
               " BSND: 1S1D/BS1D/BSND, SBND: S11D/SB1D/SBND; interleave only the first of each)", src)
    batch_heads = {"BNSD": (a, b), "BSND": (a, s), "SBND": (b, s)}[fits[0]]
    if rotary_mode == "half" and max(batch_heads) >= 1000:
        c.fail(op, "input", f"B, N = {batch_heads}: both must be < 1000 ({fits[0]})", src)
    if rotary_mode == "interleave" and batch_heads[0] * batch_heads[1] >= 1000:
        c.fail(op, "input", f"B * N = {batch_heads[0] * batch_heads[1]} must be < 1000", src)
    for name, t in (("r1", r1), ("r2", r2)):
        if bool((t.abs() > 1).any()):
            c.fail(op, name, "values outside the documented range [-1, 1] (cos/sin)", src)
    if rotate is not None and (rotate.dim() != 2 or tuple(rotate.shape) != (d, d)):
        c.fail(op, "rotate", f"shape {tuple(rotate.shape)} must be [{d}, {d}]", src)
    maybe_oom(st, op)
    result = torch.empty_like(input)
    nan_fill(result)
    result.copy_(oracle.rotary(input, r1, r2, rotary_mode, rotate))
    perturb(st, op, result)
    return result
