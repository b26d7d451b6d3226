"""npu_rms_norm, npu_add_rms_norm, npu_rotary_mul against their documented formulas."""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _rms(x, w, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(emu, dtype):
    import torch_npu

    x, w = torch.randn(5, 3, 96).to(dtype), (1 + torch.randn(96) * 0.1).to(dtype)
    y, rstd = torch_npu.npu_rms_norm(x, w, epsilon=1e-6)
    assert y.dtype == dtype and rstd.dtype == torch.float32 and rstd.shape == (5, 3, 1)
    torch.testing.assert_close(y.float(), _rms(x, w, 1e-6), **TOL[dtype])
    ref_rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rstd, ref_rstd, atol=1e-5, rtol=1e-5)
    y2, _ = torch.ops.npu.npu_rms_norm(input=x, gamma=w)  # the registered name is 'input'
    torch.testing.assert_close(y2, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_returns_norm_rstd_and_the_sum(emu, dtype):
    import torch_npu

    x1, x2, w = torch.randn(4, 64).to(dtype), torch.randn(4, 64).to(dtype), torch.randn(64).to(dtype)
    y, rstd, x = torch_npu.npu_add_rms_norm(x1, x2, w, 1e-5)
    torch.testing.assert_close(x, (x1.float() + x2.float()).to(dtype))
    torch.testing.assert_close(y.float(), _rms(x, w, 1e-5), **TOL[dtype])
    assert rstd.shape == (4, 1) and rstd.dtype == torch.float32


def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 256])
def test_rotary_mul_half_bsnd(emu, dtype, head_dim):
    """Gemma's use: [1, T, heads, D] with cos/sin [1, T, 1, D] (BSND, 1S1D)."""
    import torch_npu

    t = 9
    x = torch.randn(1, t, 4, head_dim).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.arange(t).float()[:, None] * inv[None]
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos()[None, :, None].to(dtype), emb.sin()[None, :, None].to(dtype)
    out = torch_npu.npu_rotary_mul(x, cos, sin)
    ref = x.float() * cos.float() + _rotate_half(x.float()) * sin.float()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_rotary_mul_interleave_and_rotate_matrix(emu):
    import torch_npu

    x = torch.randn(2, 3, 5, 8)
    cos, sin = torch.rand(1, 1, 5, 8), torch.rand(1, 1, 5, 8)
    out = torch_npu.npu_rotary_mul(x, cos, sin, "interleave")
    turned = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    torch.testing.assert_close(out, x * cos + turned * sin)
    rotate = torch.zeros(8, 8)
    rotate[:4, 4:], rotate[4:, :4] = torch.eye(4), -torch.eye(4)  # the doc's half-mode matrix
    out = torch_npu.npu_rotary_mul(x, cos, sin, "half", rotate)
    torch.testing.assert_close(out, x * cos + (x @ rotate) * sin)
