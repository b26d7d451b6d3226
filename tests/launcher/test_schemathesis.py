"""schemathesis against our own OpenAPI document (loopback, fake shards, a bounded number of
examples per route): no 500, every status and content type documented, every JSON answer
valid against its schema."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
from harness import fake_router

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)
MAX_EXAMPLES = 10


class RouterThread:
    """The fake-shard router on its own event loop, so a subprocess can call it."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.url: str | None = None
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as err:  # reported by the test
            self.error = err
            self.ready.set()

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        async with fake_router(
            self.hf_tokenizer, max_input_tokens=64, max_total_tokens=128, keep_alive_s=0.5
        ) as h:
            self.url = h.url
            self.ready.set()
            await self.stop.wait()

    def __enter__(self) -> RouterThread:
        self.thread.start()
        assert self.ready.wait(60), "the router did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


def run_schemathesis(hf_tokenizer, cwd, phases: str, examples: int, max_time: int) -> str:
    cli = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or shutil.which(
        "schemathesis"
    )
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install '.[test]')")
    with RouterThread(hf_tokenizer) as router:
        result = subprocess.run(
            [
                cli,
                "run",
                f"{router.url}/api-doc/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                str(examples),
                "--phases",
                phases,
                "--seed",
                "1",
                "--workers",
                "1",
                "--request-timeout",
                "20",
                "--max-time",
                str(max_time),
                "--no-color",
                "--generation-database",
                "none",
            ],
            capture_output=True,
            text=True,
            timeout=max_time + 120,
            cwd=cwd,  # its reports and caches stay in the test's temp directory
        )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-8000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts and counts.group(1) == counts.group(2) and int(counts.group(1)) > 50, out[-3000:]
    return out


def test_schemathesis_finds_no_server_error_or_schema_violation(hf_tokenizer, tmp_path):
    """Bounded for the default suite: each route's examples plus a few generated bodies."""
    run_schemathesis(hf_tokenizer, tmp_path, "examples,fuzzing", MAX_EXAMPLES, 20)


@pytest.mark.slow
def test_schemathesis_coverage_and_more_examples(hf_tokenizer, tmp_path):
    """The coverage phase (boundary values and invalid types of every field) and 50 bodies a
    route."""
    run_schemathesis(hf_tokenizer, tmp_path, "examples,coverage,fuzzing", 50, 240)
