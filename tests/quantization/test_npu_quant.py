"""The NPU int8 kernels (``device_kernels/npu_quant.py``) through the emulation's torch_npu operators
(real 2.13.0 schemas and documented contracts): every scheme equals the float64 oracle on the
same int8 tensors, in float16 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from quant_producers import CT_SCHEMES, MS_KINDS
from quant_helpers import load, prompt_ids, prompt_logits, quantized_linears, use_ops

CASES = (
    [("bloom", "eetq", "W8A16"), ("gemma", "eetq", "W8A16")]
    + [("gemma", "compressed-tensors", s) for s in CT_SCHEMES]
    + [("bloom", "msmodelslim", k) for k in MS_KINDS]
    + [("gemma", "msmodelslim-doc", "W8A16")]  # asymmetric: the op adds a negated offset
)
OPS = ("npu_weight_quant_batchmatmul", "npu_dynamic_quant", "npu_quantize", "npu_quant_matmul")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_npu_kernels_equal_the_oracle(case, dtype, float_dirs, quantized_dir, npu_emulated):
    arch, producer, scheme = case
    model_dir = float_dirs[arch] if producer == "eetq" else quantized_dir(arch, producer, scheme)
    model = load(model_dir, "eetq" if producer == "eetq" else None, ops="npu", dtype=dtype)
    ids = prompt_ids(model.config.vocab_size, n=20)
    ours = prompt_logits(model, ids)
    calls = {op: npu_emulated.calls[op] for op in OPS}
    label = quantized_linears(model)[0].method.scheme.label
    expected = {"w8a16": {"npu_weight_quant_batchmatmul"},
                "w8a8-dynamic": {"npu_dynamic_quant", "npu_quant_matmul"},
                "w8a8-static": {"npu_quantize", "npu_quant_matmul"}}[label]
    assert {op for op, n in calls.items() if n} == expected
    use_ops(model, "reference")
    oracle = prompt_logits(model, ids)
    # both sides round every activation to the half dtype between layers; an activation
    # quantized one step apart (W8A8) or a half-precision rounding (W8A16 scales) differs
    err = float((ours - oracle).abs().max() / oracle.abs().max())
    assert err < 3e-2, f"{case} {dtype}: {err:.2e}"
