"""The fused activations against HF transformers' own modules (the oracle)."""

from __future__ import annotations

import pytest
import torch
from tgi_npu_backend.models.layers.activation import BloomGelu, GeluAndMul
from transformers.activations import GELUTanh
from transformers.models.bloom.modeling_bloom import BloomGelu as HFBloomGelu


def test_bloom_gelu_matches_hf_float32():
    x = torch.randn(257, 4096, generator=torch.Generator().manual_seed(0)) * 4
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-8, -30.0, 30.0])
    torch.testing.assert_close(BloomGelu()(x), HFBloomGelu().eval()(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bloom_gelu_in_place_is_the_same_function(dtype):
    """``inplace=True`` writes the same values into its input and returns it; the default leaves
    the input alone."""
    x = (torch.randn(65, 512, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    before = x.clone()
    expected = BloomGelu()(x)
    assert torch.equal(x, before)
    out = BloomGelu(inplace=True)(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bloom_gelu_half_is_at_least_as_close_to_float32_as_hf(dtype):
    """In half precision HF rounds after each of its seven operations, the fused kernel once."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(1)) * 4
    exact = HFBloomGelu()(x)
    ours = (BloomGelu()(x.to(dtype)).float() - exact).abs().mean()
    theirs = (HFBloomGelu()(x.to(dtype)).float() - exact).abs().mean()
    assert ours <= theirs


def test_gelu_and_mul_matches_hf_gelu_pytorch_tanh():
    x = torch.randn(33, 2 * 96, generator=torch.Generator().manual_seed(2))
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(GeluAndMul("tanh")(x), GELUTanh()(gate) * up)
