"""tgi-npu-launcher with a hub id and no hub: it fails in seconds, says what to do once, and logs
nothing derived from the config it could not read; offline with a cached config it goes on."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
from tgi_npu_backend.launcher.errors import LauncherError
from tgi_npu_backend.launcher.model_config import load_config

HUB_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy",
            "ALL_PROXY", "all_proxy")


def _env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HUB_VARS}
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "extra, says",
    [({"HF_ENDPOINT": "https://hub.invalid"}, "hub.invalid does not resolve"),
     ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set")],
)
def test_hub_id_without_a_hub_fails_in_seconds(tmp_path, extra, says):
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "tgi_npu_backend.launcher", "--model-id", "org/not-cached",
         "--port", "0", "--shard-uds-path", str(tmp_path / "s")],
        capture_output=True, text=True, env=_env(tmp_path, **extra), timeout=60, check=False,
    )
    elapsed = time.monotonic() - start
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert elapsed < 10, f"{elapsed:.1f} s:\n{out}"
    assert out.count(says) == 1, out
    assert "Retrying" not in out
    assert "Using attention" not in out and "Starting shard" not in out  # nothing after it
    assert not list(tmp_path.glob("s-*"))


def _cache_with_config(tmp_path, model: str, config: dict):
    cache = tmp_path / "hub"
    repo = cache / f"models--{model.replace('/', '--')}"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return cache


def test_offline_with_a_cached_config_reads_the_cached_copy(tmp_path, monkeypatch, caplog):
    bloom = {"model_type": "bloom", "n_head": 4, "hidden_size": 64}
    cache = _cache_with_config(tmp_path, "org/tiny", bloom)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with caplog.at_level(logging.INFO):
        assert load_config("org/tiny", None, {"HF_HUB_OFFLINE": "1"}) == bloom
        assert load_config("org/tiny", None, {"HF_ENDPOINT": "https://hub.invalid"}) == bloom
    assert "The hub is not asked (HF_HUB_OFFLINE is set)" in caplog.text
    with pytest.raises(LauncherError, match="HF_HUB_OFFLINE is set"):
        load_config("org/other", None, {"HF_HUB_OFFLINE": "1"})


def test_unreadable_local_config_is_an_error_not_a_guess(tmp_path):
    with pytest.raises(LauncherError, match="has no config.json"):
        load_config(str(tmp_path), None, {})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LauncherError, match="cannot read"):
        load_config(str(tmp_path), None, {})
    with pytest.raises(LauncherError, match="no such directory"):
        load_config(str(tmp_path / "absent"), None, {})


def test_huggingface_hub_warnings_are_printed_once(capsys):
    from tgi_npu_backend.launcher.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(False)
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        captured = capsys.readouterr()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert (captured.out + captured.err).count("Retrying in 1s") == 1, captured
