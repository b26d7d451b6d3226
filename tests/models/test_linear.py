"""The CPU ``linear`` (oneDNN for float32) against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgi_npu_backend.models.layers.linear import ONEDNN_LINEAR, linear


def test_onednn_linear_is_used_here():
    assert ONEDNN_LINEAR  # the torch CPU wheels ship oneDNN; without it linear is F.linear


@pytest.mark.parametrize("rows", [0, 1, 2, 32, 129, 700])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_equals_f_linear(rows, bias, dtype):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 48, generator=g), torch.randn(96, 48, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None
    out = linear(x, w, b)
    assert out.shape == (rows, 96) and out.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(out, F.linear(x, w, b), **tol)


def test_linear_takes_strided_inputs_and_batched_rows():
    w = torch.randn(64, 32)
    x = torch.randn(32, 7).t()  # [7, 32], not contiguous
    torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    x3 = torch.randn(2, 5, 32)
    torch.testing.assert_close(linear(x3, w), F.linear(x3, w), atol=1e-5, rtol=1e-5)
