"""Quantized models served the way the router drives a shard (``text-generation-server serve``
processes, tests/router_sim.py): in a changing batch every request equals its solo run; two
ranks (tensor parallel) serve what one rank serves; Info and the startup log name the scheme."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from router_sim import RouterSim, start_shard
from served_equal import HALF_TOLERANCE, logprob_tolerance, same_top_tokens
from transformers import AutoTokenizer

SPECS = {
    "a": dict(text="The quick brown fox", max_new_tokens=14, ignore_eos=True),
    "b": dict(text="Hello 深度学习", max_new_tokens=8, top_n=3, prefill_logprobs=True),
    "c": dict(text="def add(a, b):", max_new_tokens=10, ignore_eos=True),
    "d": dict(text="Ascend NPU paged", max_new_tokens=9, do_sample=True, seed=42,
              temperature=0.8, top_k=50, repetition_penalty=1.3),
}
# (arch, producer, scheme, device, dtype): every scheme once; the NPU kernels via the emulation
SERVED = [
    ("bloom", "eetq", "W8A16", "cpu", "float32"),
    ("gemma", "compressed-tensors", "W8A16", "cpu", "float32"),
    ("bloom", "compressed-tensors", "W8A8", "cpu", "float32"),
    ("gemma", "compressed-tensors", "W8A8-static", "cpu", "float32"),
    ("bloom", "msmodelslim", "W8A8", "cpu", "float32"),
    ("gemma", "msmodelslim", "W8A16", "npu-emulated", "bfloat16"),
    ("bloom", "msmodelslim", "W8A8_DYNAMIC", "npu-emulated", "float16"),
    # W8A16 with 16-bit activations on the CPU: bfloat16 model, packed float layers and LM head
    ("bloom", "eetq", "W8A16", "cpu", "bfloat16"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(case, float_dirs, quantized_dir):
    arch, producer, scheme = case[:3]
    if producer == "eetq":
        return float_dirs[arch], ["--quantize", "eetq"]
    return quantized_dir(arch, producer, scheme), []


def _start(model_dir, args, world_size=1):
    uds = f"{tempfile.gettempdir()}/tgi-q-{uuid.uuid4().hex[:8]}"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "TGI_NPU_DIST_TIMEOUT": "60"}
    extra = (["--sharded"] if world_size > 1 else []) + args
    with ThreadPoolExecutor(world_size) as pool:
        procs = list(pool.map(lambda r: start_shard(model_dir, uds, extra_args=extra, env=env,
                                                    rank=r, world_size=world_size),
                              range(world_size)))
    sim = RouterSim(f"{uds}-0", AutoTokenizer.from_pretrained(model_dir, truncation_side="left"))
    sim.startup(max_prefill=256)
    return sim, procs


def _stop(procs: list[subprocess.Popen]) -> str:
    for p in procs:
        p.terminate()
    out = ""
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        out += p.stdout.read()
    return out


def _tolerance(case) -> float:
    """W8A16's CPU kernel (``_weight_int8pack_mm``) takes bfloat16 activations whatever the
    model's dtype: 16-bit arithmetic (``served_equal``)."""
    if case[2] == "W8A16" and case[3] == "cpu":
        return HALF_TOLERANCE
    return logprob_tolerance(f"torch.{case[4]}")


def _batched_equals_solo(sim: RouterSim, tol: float) -> dict:
    def alone(spec):
        spec = dict(spec)
        req = sim.request(spec.pop("text"), **spec)
        return sim.run({0: [req]})[req.id]

    solo = {k: alone(v) for k, v in SPECS.items()}
    reqs = {}
    for k, v in SPECS.items():
        v = dict(v)
        reqs[k] = sim.request(v.pop("text"), **v)
    got = sim.run({0: [reqs["a"], reqs["b"]], 2: [reqs["c"]], 3: [reqs["d"]]})
    for k, req in reqs.items():
        x, y = got[req.id], solo[k]
        assert x.ids == y.ids and x.texts == y.texts, k
        assert x.generated_text == y.generated_text, k
        same_top_tokens(x.top_tokens, x.top_logprobs, y.top_tokens, y.top_logprobs, tol)
        assert max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs)) < tol, k
    return solo


def _case_id(c):
    return "-".join(c[:3] + (c[3],) + (("bf16",) if c[4] == "bfloat16" and c[3] == "cpu" else ()))


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[] if i == 0 else [pytest.mark.slow]) for i, c in enumerate(SERVED)],
    ids=[_case_id(c) for c in SERVED],
)
def test_router_scenario_requests_equal_their_solo_runs(case, float_dirs, quantized_dir):
    model_dir, args = _model_dir(case, float_dirs, quantized_dir)
    sim, procs = _start(model_dir, args + ["--device", case[3], "--dtype", case[4]])
    try:
        assert sim.info.dtype == f"torch.{case[4]}"
        _batched_equals_solo(sim, _tolerance(case))
    finally:
        log = _stop(procs)
    assert "quantization: " in log and ("w8a16" in log or "w8a8" in log)
    assert "reference (non-fused) path" not in log


@pytest.mark.slow
@pytest.mark.parametrize("case", [SERVED[3], SERVED[4]], ids=[_case_id(SERVED[3]),
                                                              _case_id(SERVED[4])])
def test_two_ranks_serve_what_one_rank_serves(case, float_dirs, quantized_dir):
    """Static W8A8 (per-tensor activations: every rank quantizes alike) at world size 2 gives
    the tokens of world size 1; msModelSlim's quant_bias is added by one rank only."""
    model_dir, args = _model_dir(case, float_dirs, quantized_dir)
    args += ["--device", case[3], "--dtype", case[4]]
    one, procs1 = _start(model_dir, args)
    two, procs2 = _start(model_dir, args, world_size=2)
    try:
        solo_one = _batched_equals_solo(one, _tolerance(case))
        solo_two = _batched_equals_solo(two, _tolerance(case))
        for k in SPECS:
            assert solo_two[k].ids == solo_one[k].ids, k
    finally:
        _stop(procs1 + procs2)
