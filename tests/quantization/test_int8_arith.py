"""The shared int8 arithmetic against the formats' own definitions."""

from __future__ import annotations

import pytest
import torch
from tgi_npu_backend.models.layers.quant import int8


def test_unpacking_reads_what_compressed_tensors_packs():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(0)
    for k in (128, 100, 36):  # whole int32 words, and a row that ends mid-word
        q = torch.randint(-128, 128, (6, k), generator=g, dtype=torch.int8)
        packed = pack_to_int32(q, 8)
        assert torch.equal(int8.unpack_int32_int8(packed, k), q)
    q = torch.randint(-128, 128, (6, 128), generator=g, dtype=torch.int8)
    assert torch.equal(int8.pack_int8_int32(q), pack_to_int32(q, 8))


def test_eetq_weight_quantization_is_symmetric_absmax_over_127_per_row():
    w = torch.tensor([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0], [2.54, 1.0, -0.01]])
    q, scale = int8.quantize_weight_per_channel(w)
    assert torch.allclose(scale[:, 0], torch.tensor([0.01, 1.0, 0.02]))
    assert q.tolist() == [[50, -127, 0], [0, 0, 0], [127, 50, 0]]


def test_per_token_quantization_is_npu_dynamic_quant_formula():
    x = torch.tensor([[1.0, -2.54, 0.3], [0.0, 0.0, 0.0]])
    q, scale = int8.quantize_per_token(x)
    assert torch.allclose(scale, torch.tensor([0.02, 1.0]))  # rowMax(|x|) / 127
    assert q.tolist() == [[50, -127, 15], [0, 0, 0]]


def test_static_quantization_follows_msmodelslim_formula():
    # input_quant = input_fp / input_scale + input_offset, rounded and clamped to int8
    x = torch.tensor([[0.1, -0.25, 10.0, -10.0]])
    assert int8.quantize_static(x, 0.05, -3.0).tolist() == [[-1, -8, 127, -128]]


def test_dequantize_per_group_with_offsets():
    q = torch.tensor([[10, 20, 30, 40]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 2.0]])
    offset = torch.tensor([[10.0, -10.0]])
    w = int8.dequantize_weight(q, scale, offset)  # (q - offset) * scale per group of 2
    assert w.tolist() == [[0.0, 5.0, 80.0, 100.0]]


def test_float16_deq_scale_bits_round_trip():
    values = torch.tensor([1e-4, 0.5, 3.25e-3])
    bits = int8.float32_to_int64_bits(values)
    assert bits.dtype == torch.int64
    # msModelSlim: np.frombuffer(deqscale.tobytes(), dtype=np.int32).astype(np.int64)
    import numpy as np

    assert bits.tolist() == np.frombuffer(values.numpy().tobytes(), np.int32).astype(np.int64).tolist()
    assert torch.equal(int8.int64_to_float32_bits(bits), values)


def test_packing_refuses_wrong_input():
    with pytest.raises(ValueError, match="int32"):
        int8.unpack_int32_int8(torch.zeros(2, 2, dtype=torch.int64), 8)
