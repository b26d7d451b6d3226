"""Each scheme's quantized forward against the float64 dequantized oracle (same int8 tensors,
``ops_reference``), against the float model it came from, and (compressed-tensors) against HF
transformers' own loading of the checkpoint."""

from __future__ import annotations

import pytest
import torch
from quant_producers import CT_SCHEMES, MS_KINDS
from quant_helpers import load, prompt_ids, prompt_logits, quantized_linears, use_ops

from tgi_npu_backend.models.layers.linear import BF16_ONEDNN

CASES = (
    [(a, "eetq", "W8A16") for a in ("bloom", "gemma")]
    + [(a, "compressed-tensors", s) for a in ("bloom", "gemma") for s in CT_SCHEMES]
    + [(a, "msmodelslim", k) for a in ("bloom", "gemma") for k in MS_KINDS]
    + [("bloom", "msmodelslim-doc", "W8A16"), ("gemma", "msmodelslim-doc", "W8A8")]
)
# Tolerances, relative to the largest |logit| of the oracle (measured here: W8A16 <= 1.4e-3,
# W8A8 <= 2.6e-7): W8A16 runs its CPU matmul on bfloat16 activations (8-bit mantissa); W8A8
# multiplies exact int32 products by float32 scales, and an activation that lands on a rounding
# boundary may quantize one step apart.
TOL = {"w8a16": 5e-3, "w8a8-dynamic": 1e-4, "w8a8-static": 1e-4}
# HF decompresses the same int8 weights (W8A16: the same numbers). NOTE: for dynamic activations
# compressed-tensors' own fake quantization divides absmax by 127.5 (calculate_qparams:
# bit_range / 2), the int8 kernels (torch_npu npu_dynamic_quant, vLLM) by 127, so W8A8-dynamic
# differs by activation-rounding noise (measured here: 3.4e-3; the others <= 2.2e-7).
HF_TOL = {"W8A16": 1e-5, "W8A16-channel": 1e-5, "W8A8": 1e-2, "W8A8-static": 1e-5}


def _dir(case, float_dirs, quantized_dir):
    arch, producer, scheme = case
    if producer == "eetq":
        return float_dirs[arch], "eetq"
    return quantized_dir(arch, producer, scheme), None


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_quantized_logits_match_the_dequantized_oracle(case, float_dirs, quantized_dir):
    model_dir, flag = _dir(case, float_dirs, quantized_dir)
    model = load(model_dir, flag)
    linears = quantized_linears(model)
    assert len(linears) == 2 * 4  # every decoder-block linear of the 2 layers (fused as served)
    label = linears[0].method.scheme.label
    ids = prompt_ids(model.config.vocab_size)
    ours = prompt_logits(model, ids)
    use_ops(model, "reference")
    oracle = prompt_logits(model, ids)
    err = float((ours - oracle).abs().max() / oracle.abs().max())
    assert err < TOL[label], f"{label}: max |ours - oracle| / max |oracle| = {err:.2e}"

    # the scheme read right: close to the float model it was quantized from
    float_logits = prompt_logits(load(float_dirs[case[0]]), ids)
    cos = torch.nn.functional.cosine_similarity(oracle, float_logits, dim=-1)
    assert float(cos.min()) > 0.98, f"quantized vs float logits: cosine {float(cos.min()):.4f}"


# W8A16 as its name says, with 16-bit activations: on the CPU the model in bfloat16 (``--dtype
# bfloat16``), oneDNN-packed bfloat16 float layers and LM head, the int8 kernel on the bfloat16
# activations as they come. Both sides round every activation to bfloat16 between layers.
BF16_CASES = [("bloom", "eetq", "W8A16"), ("gemma", "compressed-tensors", "W8A16"),
              ("bloom", "msmodelslim", "W8A16"), ("gemma", "compressed-tensors", "W8A8")]


@pytest.mark.parametrize("case", BF16_CASES, ids=["-".join(c) for c in BF16_CASES])
def test_bfloat16_cpu_serving_matches_the_dequantized_oracle(case, float_dirs, quantized_dir):
    model_dir, flag = _dir(case, float_dirs, quantized_dir)
    model = load(model_dir, flag, dtype=torch.bfloat16)
    assert model.lm_head.packed is not None or not BF16_ONEDNN
    ids = prompt_ids(model.config.vocab_size)
    ours = prompt_logits(model, ids)
    use_ops(model, "reference")
    oracle = prompt_logits(model, ids)
    err = float((ours - oracle).abs().max() / oracle.abs().max())
    assert err < 3e-2, f"{case} bfloat16: {err:.2e}"
    float_logits = prompt_logits(load(float_dirs[case[0]]), ids)
    cos = torch.nn.functional.cosine_similarity(ours, float_logits, dim=-1)
    assert float(cos.min()) > 0.98, f"bfloat16 quantized vs float32 logits: cosine {float(cos.min()):.4f}"


@pytest.mark.parametrize("scheme", CT_SCHEMES)
@pytest.mark.parametrize("arch", ["bloom", "gemma"])
def test_compressed_tensors_agree_with_hf_transformers(arch, scheme, quantized_dir):
    """HF transformers loads the checkpoint itself (decompressing the int8 weights; W8A8 runs its
    activations through compressed-tensors' quantize-dequantize): its logits = ours."""
    from transformers import AutoModelForCausalLM

    model_dir = quantized_dir(arch, "compressed-tensors", scheme)
    ours_model = load(model_dir)
    ids = prompt_ids(ours_model.config.vocab_size, seed=1)
    use_ops(ours_model, "reference")
    ours = prompt_logits(ours_model, ids)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < HF_TOL[scheme], f"max |ours - HF| / max |HF| = {err:.2e}"


def test_int8_layers_hold_a_quarter_of_the_float_bytes(float_dirs):
    """What the KV pool sizing sees after loading (it sizes from the memory left): the decoder
    linears' int8 weights plus float32 scales, against their float32 weights."""
    from tgi_npu_backend.models.layers.quant.methods import weight_bytes

    float_model, int8_model = load(float_dirs["gemma"]), load(float_dirs["gemma"], "eetq")
    float_linears = sum(
        m.weight.numel() * m.weight.element_size() for m in float_model.modules()
        if type(m).__name__.endswith("ParallelLinear")
    )
    int8_linears = sum(m.method.int8.nbytes() for m in quantized_linears(int8_model))
    assert 0.25 < int8_linears / float_linears < 0.27  # 1 byte + a 4-byte scale per row of K=128+
    saved = weight_bytes(float_model) - weight_bytes(int8_model)
    assert saved == float_linears - int8_linears
