"""What the shard assumes of msModelSlim's W8A8 export, checked on msModelSlim's own output: the
float bias is folded into quant_bias (so the shard consumes ``bias`` without adding it, as
vllm-ascend does), and deq_scale = input_scale * weight_scale, stored as float32 bits in int64."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tgi_npu_backend.models.layers.quant.int8 import int64_to_float32_bits


def test_w8a8_quant_bias_carries_the_float_bias(quantized_dir):
    d = quantized_dir("bloom", "msmodelslim", "W8A8")  # BLOOM: biases (perturbed) everywhere
    desc = json.loads(next(d.glob("quant_model_description*.json")).read_text())
    assert desc["model_quant_type"] == "W8A8"
    state = {}
    for f in d.glob("*.safetensors"):
        state |= load_file(str(f))
    layers = [k.removesuffix(".quant_bias") for k in state if k.endswith(".quant_bias")]
    assert len(layers) == 8
    for p in layers:
        assert desc[f"{p}.weight"] == "W8A8" and desc[f"{p}.bias"] == "FLOAT"
        q = state[f"{p}.weight"].double()
        assert state[f"{p}.deq_scale"].dtype == torch.int64
        deq = int64_to_float32_bits(state[f"{p}.deq_scale"]).double()
        in_scale, in_offset = float(state[f"{p}.input_scale"]), float(state[f"{p}.input_offset"])
        weight_scale = state[f"{p}.weight_scale"].double().flatten()
        torch.testing.assert_close(deq, in_scale * weight_scale, rtol=1e-6, atol=0)
        bias = state[f"{p}.bias"].double()
        assert float(bias.abs().max()) > 0.05
        folded = torch.round(bias / deq) - in_offset * q.sum(1)
        assert float((state[f"{p}.quant_bias"].double() - folded).abs().max()) <= 1, p
        without = -in_offset * q.sum(1)
        assert float((state[f"{p}.quant_bias"].double() - without).abs().max()) > 100, p


@pytest.mark.parametrize("kind", ["W8A16", "W8A8_DYNAMIC"])
def test_weight_scales_per_output_channel(kind, quantized_dir):
    d = quantized_dir("gemma", "msmodelslim", kind)
    state = load_file(str(next(d.glob("*.safetensors"))))
    p = "model.layers.0.mlp.down_proj"
    assert state[f"{p}.weight"].dtype == torch.int8
    assert tuple(state[f"{p}.weight_scale"].shape) == (state[f"{p}.weight"].shape[0], 1)
