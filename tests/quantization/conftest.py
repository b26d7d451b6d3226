"""Tiny float checkpoints wide enough for llmcompressor's W8A16 preset (groups of 128 input
columns) with 8 heads (tensor-parallel world sizes up to 8), and their quantized copies, each
written once per session."""

from __future__ import annotations

import pytest
import torch
from quant_producers import (
    compressed_tensors_checkpoint,
    msmodelslim_checkpoint,
    msmodelslim_tool_checkpoint,
)
from safetensors.torch import load_file, save_file

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="session")
def float_dirs(tmp_path_factory):
    from tgi_npu_backend.demo import write_checkpoint

    root = tmp_path_factory.mktemp("qfloat")
    bloom = write_checkpoint(
        root / "bloom", "bloom", seed=5, hidden_size=128, n_head=8, initializer_range=0.05
    )
    # HF's initial biases are zero, which would hide a bias lost or added twice (msModelSlim's
    # quant_bias carries it; row-parallel layers add it once)
    path = bloom / "model.safetensors"
    state = load_file(str(path))
    g = torch.Generator().manual_seed(7)
    for name, t in state.items():
        if name.endswith(".bias") and "layernorm" not in name:
            state[name] = t + 0.2 * torch.randn(t.shape, generator=g)
    save_file(state, str(path))
    return {
        "bloom": bloom,
        "gemma": write_checkpoint(
            root / "gemma", "gemma", seed=6, hidden_size=128, intermediate_size=256,
            num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, initializer_range=0.05,
        ),
    }




@pytest.fixture(scope="session")
def quantized_dir(float_dirs, tmp_path_factory):
    """``quantized_dir(arch, producer, scheme)`` -> a checkpoint directory (made once);
    producer: compressed-tensors, msmodelslim (the tool) or msmodelslim-doc."""
    made = {}

    def make(arch: str, producer: str, scheme: str):
        key = (arch, producer, scheme)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}-{producer}-{scheme}".lower())
            if producer == "compressed-tensors":
                made[key] = compressed_tensors_checkpoint(float_dirs[arch], out, scheme)
            elif producer == "msmodelslim":
                pytest.importorskip("msmodelslim")
                made[key] = msmodelslim_tool_checkpoint(float_dirs[arch], out, scheme)
            else:  # "msmodelslim-doc": written from its documentation
                made[key] = msmodelslim_checkpoint(float_dirs[arch], out, scheme, arch)
        return made[key]

    return make
