"""``tgi-npu-benchmark`` against a real shard and ``tgi-npu-eval`` against the launcher serving a
tiny BLOOM; the eval's choice scores are checked against the same scoring done with HF
transformers directly (the oracle)."""

from __future__ import annotations

import asyncio
import csv
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from processes import launch
from router_sim import start_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgi_npu_backend.launcher import benchmark, evaluate

pytestmark = pytest.mark.slow
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "mc_sample.jsonl"

if shutil.which("text-generation-server") is None:
    pytest.skip("text-generation-server is not installed", allow_module_level=True)


def test_benchmark_writes_latency_tables_for_every_case(bloom_dir, tmp_path):
    uds = os.path.join(tempfile.mkdtemp(prefix="uds"), "s")
    shard = start_shard(bloom_dir, uds)
    try:
        out = tmp_path / "bench"
        benchmark.main([
            "--tokenizer-name", str(bloom_dir), "--master-shard-uds-path", f"{uds}-0",
            "--batch-size", "1", "3", "--sequence-length", "8", "--decode-length", "4",
            "--cases", "[[20, 2]]", "--runs", "2", "--warmups", "1", "--output", str(out),
            "--no-progress",
        ])
    finally:
        shard.kill()
        shard.wait()
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["batch"], r["input"], r["output"]) for r in rows] == [
        ("1", "8", "4"), ("3", "8", "4"), ("1", "20", "2"), ("3", "20", "2")
    ]
    for r in rows:
        assert 0 < float(r["prefill_ms_p50"]) <= float(r["prefill_ms_p99"]) <= float(r["prefill_ms_max"])
        assert 0 < float(r["decode_token_ms_min"]) <= float(r["decode_token_ms_p90"])
        assert float(r["e2e_tok_s"]) > 0 and float(r["decode_tok_s"]) > 0
    report = Path(f"{out}.md").read_text()
    assert "## MindIE-style summary" in report and report.count("\n| 3 | 20 | 2 |") == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert Path(f"{out}.png").stat().st_size > 0


def hf_choice_logprobs(model_dir, items, style) -> list[list[float]]:
    """The oracle: the same prompts and continuations scored by HF transformers."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = []
    for item in items:
        prompt, continuations = evaluate.prompt_and_continuations(item, style)
        n_prompt = len(tok(prompt)["input_ids"])
        row = []
        for cont in continuations:
            ids = tok(prompt + cont)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            row.append(sum(float(logprobs[p - 1, ids[p]]) for p in range(n_prompt, len(ids))))
        scores.append(row)
    return scores


@pytest.fixture(scope="module")
def launcher_url(bloom_dir):
    run = launch(bloom_dir, "--max-input-tokens", "200", "--max-total-tokens", "256",
                 "--max-batch-prefill-tokens", "512")
    try:
        run.wait_ready(120)
        yield run.url
    finally:
        run.stop()


@pytest.mark.parametrize("style", ["letters", "choices"])
def test_eval_scores_match_hf_scoring(launcher_url, bloom_dir, style):
    items = evaluate.load_items(SAMPLE)
    assert [i.answer for i in items] == [0, 2, 1, 2, 0, 1, 1, 0]  # index, letter, text, bool
    results, stats = asyncio.run(evaluate.evaluate(launcher_url, items, style, 4, progress=False))
    expected = hf_choice_logprobs(bloom_dir, items, style)
    for r, theirs in zip(results, expected):
        assert all(math.isfinite(x) for x in r.logprobs)
        assert r.logprobs == pytest.approx(theirs, abs=1e-3)
        best = sorted(theirs, reverse=True)
        if best[0] - best[1] > 1e-3:
            assert r.pred == theirs.index(best[0])
    acc = evaluate.summary(results)
    assert set(acc["subjects"]) == {"geography", "arithmetic", "boolq"}
    assert acc["all"]["n"] == 8 and 0 <= acc["all"]["acc"] <= 1
    assert stats["requests"] == sum(len(i.choices) for i in items) and stats["requests_per_s"] > 0


def test_eval_command_line_prints_accuracy(launcher_url, tmp_path, capsys):
    out = tmp_path / "eval.json"
    evaluate.main([str(SAMPLE), "--url", launcher_url, "--limit", "3", "--output", str(out),
                   "--no-progress"])
    printed = capsys.readouterr().out
    assert "3 questions, style letters: acc " in printed and "| geography | 3 |" in printed
    assert "scoring requests/s" in printed and out.exists()
