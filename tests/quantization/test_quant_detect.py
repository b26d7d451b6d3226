"""Which scheme a directory and --quantize select, and the refusals (naming the value and what
is supported)."""

from __future__ import annotations

import json
import shutil

import pytest
from tgi_npu_backend.models.layers.quant import detect

from tgi_npu_backend.config import ServerConfig


def _with_config(src, dst, **quantization_config):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("value", ["gptq", "awq", "fp8", "bitsandbytes", "exl2", "marlin"])
def test_unsupported_quantize_is_refused_at_startup_listing_what_is(value):
    with pytest.raises(ValueError) as err:
        ServerConfig.from_cli(model_id="m", env={}, quantize=value)
    msg = str(err.value)
    assert f"--quantize {value}" in msg
    assert "eetq" in msg and "compressed-tensors" in msg and "msmodelslim" in msg


@pytest.mark.parametrize("value", ["eetq", "compressed-tensors", "msmodelslim"])
def test_supported_quantize_is_accepted(value):
    assert ServerConfig.from_cli(model_id="m", env={}, quantize=value).quantize == value


def test_float_checkpoint_float_unless_eetq(float_dirs):
    assert detect(float_dirs["bloom"], None) is None
    q = detect(float_dirs["bloom"], "eetq")
    assert q.method == "eetq" and q.description == "eetq w8a16"
    with pytest.raises(ValueError, match="--quantize compressed-tensors needs config.json"):
        detect(float_dirs["bloom"], "compressed-tensors")
    with pytest.raises(ValueError, match="--quantize msmodelslim needs a quant_model_description"):
        detect(float_dirs["bloom"], "msmodelslim")


@pytest.mark.parametrize("scheme, label", [
    ("W8A16", "w8a16"), ("W8A8", "w8a8-dynamic"), ("W8A8-static", "w8a8-static"),
])
def test_compressed_tensors_detected_from_config_json(scheme, label, quantized_dir):
    d = quantized_dir("bloom", "compressed-tensors", scheme)
    for flag in (None, "compressed-tensors"):  # the stock launcher passes it; without it too
        q = detect(d, flag)
        assert q.method == "compressed-tensors" and q.labels == [label]
        assert q.scheme_for(["transformer.h.0.mlp.dense_h_to_4h"]).label == label
        assert q.scheme_for(["lm_head"]) is None  # the ignore list
    with pytest.raises(ValueError, match="already quantized"):
        detect(d, "eetq")
    with pytest.raises(ValueError, match="use --quantize compressed-tensors"):
        detect(d, "msmodelslim")


@pytest.mark.parametrize("kind, label", [
    ("W8A16", "w8a16"), ("W8A8", "w8a8-static"), ("W8A8_DYNAMIC", "w8a8-dynamic"),
])
def test_msmodelslim_detected_from_its_description(kind, label, quantized_dir):
    d = quantized_dir("gemma", "msmodelslim", kind)
    q = detect(d, None)
    assert q.method == "msmodelslim" and q.labels == [label]
    assert q.scheme_for(["model.layers.1.self_attn.o_proj"]).label == label
    assert q.scheme_for(["model.embed_tokens"]) is None  # FLOAT


@pytest.mark.parametrize("method", ["gptq", "awq", "fp8", "bitsandbytes"])
def test_other_quant_methods_in_config_json_are_refused(method, float_dirs, tmp_path):
    d = _with_config(float_dirs["bloom"], tmp_path / "m", quant_method=method, bits=4)
    with pytest.raises(ValueError, match=f"quant_method '{method}' is not served.*eetq"):
        detect(d, None)


@pytest.mark.parametrize("edit, needle", [
    ({"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                  "symmetric": True}}, "are not int8"),
    ({"weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}},
     "are not int8"),
    ({"weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": False}},
     "asymmetric weights"),
    ({"weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
      "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": False,
                            "symmetric": True}}, "static activations must be symmetric per-tensor"),
])
def test_compressed_tensors_schemes_it_cannot_run_are_refused(edit, needle, float_dirs, tmp_path):
    group = {"targets": ["Linear"], "format": "int-quantized", **edit}
    d = _with_config(float_dirs["bloom"], tmp_path / "m", quant_method="compressed-tensors",
                     format="int-quantized", config_groups={"group_0": group})
    with pytest.raises(ValueError, match=needle):
        detect(d, None)


def test_w8a16_runs_in_bfloat16_on_the_cpu_unless_told(float_dirs, quantized_dir):
    """W8A16 means 16-bit activations: on the CPU a weight-only int8 model defaults to bfloat16
    (where oneDNN has bfloat16 kernels); --dtype wins, and W8A8 and float models stay float32."""
    import torch

    from tgi_npu_backend.device import select_dtype, select_platform
    from tgi_npu_backend.models.layers.linear import BF16_ONEDNN

    cpu = select_platform("cpu", 0, None)
    w8a16 = detect(float_dirs["bloom"], "eetq").labels == ["w8a16"]
    w8a8 = detect(quantized_dir("bloom", "compressed-tensors", "W8A8"), None).labels == ["w8a16"]
    assert w8a16 and not w8a8
    half = torch.bfloat16 if BF16_ONEDNN else torch.float32
    assert select_dtype(None, cpu, "float32", weight_only_int8=w8a16) == half
    assert select_dtype("float32", cpu, "float32", weight_only_int8=w8a16) == torch.float32
    assert select_dtype(None, cpu, "bfloat16", weight_only_int8=w8a8) == torch.float32
    assert select_dtype(None, cpu, "bfloat16") == torch.float32
