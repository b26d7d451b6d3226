"""Shared fixtures: tiny random-weight checkpoints written once per test session.

The model hub is unreachable here, so every model test builds its own checkpoint with
``tgi_npu_backend.demo.write_checkpoint`` (random weights from transformers configs, a byte-level
BPE tokenizer trained locally). HF transformers on the same files is the oracle.

Each session gets a private temporary directory (``TMPDIR``, inherited by every process a test
starts), removed when the session ends: sockets of shards a test killed, launcher logs and
pytest's own ``tmp_path`` directories included. ``TGI_NPU_KEEP_TMP=1`` keeps it for a post-mortem.
Keep paths short (Unix socket paths are at most 107 bytes): ``tempfile.gettempdir()`` is.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_SESSION_TMP: list[str] = []


def pytest_configure(config):
    base = tempfile.mkdtemp(prefix="tgi-tests-")
    _SESSION_TMP.append(base)
    os.environ["TMPDIR"] = base
    tempfile.tempdir = base


def pytest_unconfigure(config):
    tempfile.tempdir = None
    for base in _SESSION_TMP:
        if os.environ.get("TGI_NPU_KEEP_TMP") == "1":
            print(f"\nkept the test session's temporary directory {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

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
