"""Model lookup errors a person can act on, printed once, in seconds: offline mode, a hub whose
host does not resolve, a directory that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tgi_npu_backend.hub import (
    HubUnreachableError,
    ModelNotFoundError,
    check_hub_reachable,
    download_weights,
    resolve_model_dir,
)

# RFC 2606: names under .invalid never resolve, so these tests need no network and never use it.
UNRESOLVABLE = {"HF_ENDPOINT": "https://hub.invalid"}


def _clean_env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY",
                        "https_proxy", "ALL_PROXY", "all_proxy")}
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    env.update(extra)
    return env


def test_offline_mode_is_refused_at_once_with_what_to_do():
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE is set") as err:
            check_hub_reachable("org/model", {var: "1"})
        assert err.value.reason == "HF_HUB_OFFLINE is set"
        assert "pass a local directory" in str(err.value)
    check_hub_reachable("org/model", {"HF_HUB_OFFLINE": "0", "HTTPS_PROXY": "http://proxy:3128"})


def test_an_unresolvable_hub_fails_in_seconds_naming_the_host():
    start = time.monotonic()
    with pytest.raises(HubUnreachableError, match="hub.invalid does not resolve") as err:
        check_hub_reachable("org/model", UNRESOLVABLE)
    assert time.monotonic() - start < 5
    assert "HF_HUB_OFFLINE=1" in str(err.value)
    # behind a proxy the proxy resolves names: nothing to check here
    check_hub_reachable("org/model", {**UNRESOLVABLE, "HTTPS_PROXY": "http://proxy:3128"})


def test_a_missing_directory_is_named_as_one():
    for model_id in ("/nonexistent/model", "./not-here", "~/nothing"):
        with pytest.raises(ModelNotFoundError, match="no such directory"):
            resolve_model_dir(model_id)
        with pytest.raises(ModelNotFoundError, match="no such directory"):
            download_weights(model_id)


def test_download_weights_offline_fails_in_seconds_and_says_it_once(tmp_path):
    for extra in (UNRESOLVABLE, {"HF_HUB_OFFLINE": "1"}):
        start = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "tgi_npu_backend.cli", "download-weights", "org/not-cached",
             "--json-output"],
            capture_output=True, text=True, env=_clean_env(tmp_path, **extra), timeout=60, check=False,
        )
        elapsed = time.monotonic() - start
        assert res.returncode == 1, res.stderr
        assert elapsed < 10, f"{elapsed:.1f} s"
        assert "Retrying" not in res.stderr
        errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "org/not-cached" in errors[0], res.stderr
        assert "org/not-cached" not in res.stdout  # not a second time as a log line


def test_serve_a_missing_directory_prints_its_message_once(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "tgi_npu_backend.cli", "serve", "/nonexistent", "--uds-path",
         str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode == 1
    both = res.stdout + res.stderr
    assert both.count("no such directory") == 1, both
    assert "'/nonexistent'" in res.stderr
