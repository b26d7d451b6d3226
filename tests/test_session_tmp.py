"""A test session leaves nothing in the temporary directory (conftest.py gives each session a
private one, inherited by every process a test starts, and removes it at the end)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_this_session_runs_in_a_private_temporary_directory():
    here = tempfile.gettempdir()
    assert os.path.basename(here).startswith("tgi-tests-") and os.environ["TMPDIR"] == here


def test_a_session_leaves_nothing_behind(tmp_path):
    outer = tmp_path / "tmp"
    outer.mkdir()
    # one quick test that uses tmp_path and starts a launcher process
    test = "tests/launcher/test_offline_startup.py::test_hub_id_without_a_hub_fails_in_seconds"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(outer)}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert list(outer.iterdir()) == []
