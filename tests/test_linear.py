"""The CPU few-rows ``linear`` (``W @ x^T``, tall weights in row chunks) against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgi_npu_backend.models.layers.linear import CHUNK_BYTES, FEW_ROWS, linear


@pytest.mark.parametrize("rows", [1, 2, 32, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("out_features", [96, CHUNK_BYTES // 4 + 7])  # one piece / row chunks
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(rows, out_features, bias):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 48, generator=g), torch.randn(out_features, 48, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    out = linear(x, w, b)
    assert out.shape == (rows, out_features) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
