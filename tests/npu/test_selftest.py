"""``text-generation-server selftest`` in the emulated mode: passes on a healthy NPU path, and
fails naming the operator when one returns wrong values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _selftest(model_dir, emulation: str = "", *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tgi_npu_backend.cli", "selftest", str(model_dir),
         "--device", "npu-emulated", *extra],
        env={**os.environ, "TGI_NPU_EMULATION": emulation},
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("ckpt,ops", [
    ("bloom_dir", ["_npu_reshape_and_cache", "_npu_flash_attention_v2", "_npu_paged_attention_v2"]),
    ("gemma_mqa_dir", ["_npu_flash_attention", "_npu_paged_attention", "npu_rms_norm",
                       "npu_add_rms_norm", "npu_rotary_mul"]),
])
def test_selftest_passes_on_the_emulated_npu(ckpt, ops, request):
    proc = _selftest(request.getfixturevalue(ckpt), "", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout
    assert "FAIL" not in proc.stdout
    for op in ops:
        assert op in proc.stdout
    assert "model greedy decode" in proc.stdout


def test_selftest_fails_naming_the_wrong_operator(gemma_mqa_dir):
    proc = _selftest(gemma_mqa_dir, "fault=_npu_paged_attention", "--skip-model")
    assert proc.returncode == 1
    failing = [line for line in proc.stdout.splitlines() if line.rstrip().endswith("FAIL")]
    assert failing and all("_npu_paged_attention" in line for line in failing), proc.stdout
    assert "FAILED" in proc.stderr


def test_selftest_refuses_the_cpu(bloom_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "tgi_npu_backend.cli", "selftest", str(bloom_dir), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and "npu-emulated" in proc.stderr
