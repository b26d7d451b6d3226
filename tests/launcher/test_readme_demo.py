"""The README's run command, as written, trains and serves the toy demo model, and its curl gets a
plausible continuation: mostly printable ASCII, no replacement characters, and a far lower loss
under the demo model (HF transformers as the oracle) than random text of the same length.

Slow: it trains the toy (a minute or two on two quiet cores). Only the output path, the port and
(so that it cannot collide with another server here) the socket path are replaced."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from processes import free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> tuple[list[str], str, str]:
    """(the run command's steps after the installs, the curl's route, the curl's JSON body)."""
    text = README.read_text()
    section = text.split("## The two commands", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0].strip()
    steps = [s.strip() for s in block.split("&&")]
    steps = steps[next(i for i, s in enumerate(steps) if s.startswith("tgi-npu-demo-checkpoint")):]
    curl = re.search(r"curl -s localhost:8080(/\S+) -H 'Content-Type: application/json' -d '([^']+)'", section)
    assert curl, "the README's curl after the run command"
    return steps, curl.group(1), curl.group(2)


def test_readme_commands_are_the_ones_this_test_runs():
    steps, route, body = readme_commands()
    assert steps == ["tgi-npu-demo-checkpoint /tmp/demo-bloom",
                     "tgi-npu-launcher --model-id /tmp/demo-bloom --port 8080"]
    assert route == "/generate" and json.loads(body)["inputs"]


def per_char_loss(model, tok, prompt: str, continuation: str) -> float:
    """Mean negative log-likelihood per character of ``continuation`` after ``prompt``."""
    p = tok.encode(prompt, add_special_tokens=True)
    c = tok.encode(prompt + continuation, add_special_tokens=True)[len(p):]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    nll = -logp[len(p) - 1:].gather(1, torch.tensor(c)[:, None]).sum().item()
    return nll / len(continuation)


def _generate(launcher: subprocess.Popen, port: int, route: str, body: str, log_path: Path) -> str:
    """Wait for /health, then POST the README's request; the generated text."""
    deadline = time.monotonic() + 300
    while True:
        assert launcher.poll() is None, log_path.read_text()
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.5)
    r = requests.post(f"http://127.0.0.1:{port}{route}", data=body,
                      headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_run_command_serves_a_plausible_demo(tmp_path):
    steps, route, body = readme_commands()
    model_dir, port = tmp_path / "demo-bloom", free_port()
    env = {**os.environ, "TGI_NPU_DEMO_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def as_here(step: str) -> list[str]:
        return shlex.split(step.replace("/tmp/demo-bloom", str(model_dir)).replace("8080", str(port)))

    start = time.monotonic()
    subprocess.run(as_here(steps[0]), env=env, check=True, timeout=1500)
    print(f"tgi-npu-demo-checkpoint took {time.monotonic() - start:.0f} s")
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(as_here(steps[1]) + ["--shard-uds-path", str(tmp_path / "s")],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            text = _generate(launcher, port, route, body, log_path)
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(120)
    print(repr(text))
    assert "\ufffd" not in text
    assert len(text.strip()) >= 20, repr(text)
    printable = sum(c.isascii() and (c.isprintable() or c in "\n\t") for c in text)
    assert printable >= 0.95 * len(text), repr(text)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = json.loads(body)["inputs"]
    rng = random.Random(0)
    noise = "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + " \n")
                    for _ in text)
    served, random_text = per_char_loss(model, tok, prompt, text), per_char_loss(model, tok, prompt, noise)
    print(f"loss per character: served {served:.3f}, random text {random_text:.3f}")
    assert served < 0.5 * random_text
    assert not list(tmp_path.glob("s-*")), "the launcher removes its shards' sockets"
