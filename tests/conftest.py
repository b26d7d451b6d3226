"""Shared fixtures: tiny random-weight checkpoints written once per test session.

The model hub is unreachable here, so every model test builds its own checkpoint with
``tgi_npu_backend.demo.write_checkpoint`` (random weights from transformers configs, a byte-level
BPE tokenizer trained locally). HF transformers on the same files is the oracle.
"""

from __future__ import annotations

import os

import pytest

# The stock launcher always sets these; the shard must treat them as hints.
os.environ.setdefault("ATTENTION", "paged")
os.environ.setdefault("PREFIX_CACHING", "0")


@pytest.fixture(scope="session")
def bloom_dir(tmp_path_factory):
    """BLOOM, 4 heads, `transformer.` key prefix, no lm_head.weight."""
    from tgi_npu_backend.demo import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("bloom"), "bloom", seed=0)


@pytest.fixture(scope="session")
def bloom_noprefix_dir(tmp_path_factory):
    """BLOOM with the bigscience/bloom-560m naming (no prefix) and an explicit lm_head.weight;
    6 heads so the ALiBi slopes take the non-power-of-two path."""
    from tgi_npu_backend.demo import write_checkpoint

    return write_checkpoint(
        tmp_path_factory.mktemp("bloom_np"), "bloom", seed=1, strip_prefix=True,
        with_lm_head=True, n_head=6, hidden_size=96,
    )


@pytest.fixture(scope="session")
def gemma_mqa_dir(tmp_path_factory):
    """Gemma-2B shape: one KV head, head_dim != hidden/heads."""
    from tgi_npu_backend.demo import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("gemma_mqa"), "gemma", seed=2)


@pytest.fixture(scope="session")
def gemma_gqa_dir(tmp_path_factory):
    """Gemma with several KV heads (GQA 4:2), head_dim != hidden/heads."""
    from tgi_npu_backend.demo import write_checkpoint

    return write_checkpoint(
        tmp_path_factory.mktemp("gemma_gqa"), "gemma", seed=3, num_key_value_heads=2, head_dim=24,
    )


@pytest.fixture
def npu_emulated():
    """torch_npu replaced by the emulation (910B, NNAL present) for one test; yields its state."""
    from tgi_npu_backend.npu_emulation import EmulationSettings, install, uninstall

    state = install(EmulationSettings())
    state.reset_counters()
    yield state
    uninstall()
