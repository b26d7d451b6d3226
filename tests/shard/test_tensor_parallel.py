"""Tensor parallelism on CPU with gloo: world sizes 2, 4 and 8 serve exactly what one rank serves.

Oracles: the same checkpoint served by a single rank (greedy tokens equal, logprobs within 1e-4 in
float32, seeded sampling equal), and the router's contract (PROTOCOL.md 0.7, b.1): each request's
Generation comes from exactly one rank (``id % world_size``), every rank holds the same
CachedBatch, Warmup reports one capacity on every rank. Also: world sizes the model's dimensions do
not divide fail at startup naming the dimension, and a rank that dies makes its peers exit.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import tempfile
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from router_sim import U64_MAX, RouterSim, batch_requests, plain, start_shard
from tgi_npu_backend.config import ServerConfig
from tgi_npu_backend.launcher.allocator import BlockAllocator
from tgi_npu_backend.pb import generate_pb2 as pb

# 8 query heads split over up to 8 ranks; Gemma with one KV head (replicated on every rank) and
# with 4 (two per rank at world size 2, one at 4, each on two ranks at 8). head_dim 16 != hidden /
# heads, as in Gemma-7B.
CHECKPOINTS = {
    "bloom": dict(arch="bloom", seed=10, n_head=8, hidden_size=64),
    "gemma_mqa": dict(arch="gemma", seed=11, num_attention_heads=8, num_key_value_heads=1, head_dim=16),
    "gemma_kv4": dict(arch="gemma", seed=12, num_attention_heads=8, num_key_value_heads=4, head_dim=16),
}
LOGPROB_ATOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_dirs(tmp_path_factory) -> dict[str, Path]:
    from tgi_npu_backend.demo import write_checkpoint

    root = tmp_path_factory.mktemp("tp")
    return {
        name: write_checkpoint(root / name, spec["arch"], **{k: v for k, v in spec.items() if k != "arch"})
        for name, spec in CHECKPOINTS.items()
    }


# ---- (a) the generator at world sizes 1, 2, 4, 8 (torch.multiprocessing, gloo) ---------------------
def serve_workload(model_dir: str, env: dict[str, str], world_size: int) -> dict:
    """Build the shard's Generator as ``serve`` does and run a mixed workload on it: three
    requests, two more joining after two decode steps, greedy and seeded sampling, top-n,
    prefill logprobs. Returns what each step produced on this rank."""
    from tgi_npu_backend.load import build_generator

    cfg = ServerConfig.from_cli(model_id=model_dir, env=env, sharded=world_size > 1, device="cpu")
    gen = build_generator(cfg)
    sim = RouterSim("unused", AutoTokenizer.from_pretrained(model_dir, truncation_side="left"))
    warm = sim.warmup_request(None, None, 128, None)
    warmup = gen.warmup(batch_requests(warm.batch), None, 128, None)
    supported, sim.max_input, sim.max_total = warmup
    sim.allocator = BlockAllocator(supported, gen.block_size)
    first = [
        sim.request("The quick brown fox", max_new_tokens=10, ignore_eos=True, prefill_logprobs=True),
        sim.request("Hello 深度学习", max_new_tokens=6, ignore_eos=True, top_n=3),
        sim.request("Ascend NPU paged", max_new_tokens=9, ignore_eos=True, do_sample=True, seed=42,
                    temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.3),
    ]
    later = [
        sim.request("def add(a, b):", max_new_tokens=7, ignore_eos=True),
        sim.request("numbers 0 1 2 3", max_new_tokens=8, ignore_eos=True, do_sample=True, seed=7,
                    watermark=True, frequency_penalty=0.5, typical_p=0.9),
    ]
    steps = []

    def record(out) -> int | None:
        """Keep this rank's generations and CachedBatch of one step. No FilterBatch: a rank does
        not see the other ranks' generations; Decode drops finished requests by itself."""
        steps.append(([(g.request_id, g.tokens.ids, g.tokens.logprobs, [t.ids for t in g.top_tokens],
                        g.generated_text.text if g.generated_text else None,
                        g.prefill_tokens.logprobs[1:] if g.prefill_tokens else None)
                       for g in out.generations],
                      list(out.batch.request_ids) if out.batch else None))
        return out.batch.id if out.batch else None

    current = record(gen.prefill(*plain(sim.batch(first))))
    for _ in range(2):
        current = record(gen.decode([current]))
    joined = record(gen.prefill(*plain(sim.batch(later))))
    batches = [current, joined]
    while batches:
        current = record(gen.decode(batches))
        batches = [current] if current is not None else []
    gen.parallel.shutdown()
    return {"warmup": warmup, "steps": steps}


def _workload_worker(rank: int, world_size: int, port: int, dirs: dict[str, str], out: str) -> None:
    torch.set_num_threads(1)  # the ranks share the test machine's cores
    env = {
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TGI_NPU_DIST_TIMEOUT": "60",
        # unequal on purpose: Warmup must still report one capacity on every rank
        "TGI_NPU_KV_CACHE_FRACTION": str(0.002 * (rank + 1)),
    }
    results = {name: serve_workload(path, env, world_size) for name, path in dirs.items()}
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    torch.distributed.barrier()  # nobody leaves (taking rank 0's store along) while others work
    torch.distributed.destroy_process_group()


def merged(per_rank: list[dict], world_size: int) -> dict[int, dict]:
    """Concatenate the ranks' generations per step, as the router does, checking the contract."""
    runs = [r["steps"] for r in per_rank]
    assert len({len(s) for s in runs}) == 1, "every rank ran the same number of steps"
    out: dict[int, dict] = {}
    for step in zip(*runs, strict=True):
        batches = {tuple(b) if b is not None else None for _, b in step}
        assert len(batches) == 1, f"ranks disagree on the CachedBatch: {batches}"
        ids = Counter()
        for rank, (gens, _) in enumerate(step):
            for rid, tok, lp, top, text, prefill in gens:
                assert rid % world_size == rank, f"request {rid} answered by rank {rank}"
                ids[rid] += 1
                r = out.setdefault(rid, {"ids": [], "lps": [], "top": [], "text": None, "prefill": None})
                r["ids"] += tok
                r["lps"] += lp
                r["top"] += top
                r["text"] = text or r["text"]
                r["prefill"] = prefill if prefill is not None else r["prefill"]
        assert all(n == 1 for n in ids.values()), f"duplicated generations: {ids}"
    return out


def assert_same_results(got: dict[int, dict], ref: dict[int, dict]) -> None:
    assert sorted(got) == sorted(ref), "missing or extra requests"
    for rid, r in ref.items():
        g = got[rid]
        assert g["ids"] == r["ids"], f"request {rid}"
        assert g["top"] == r["top"] and g["text"] == r["text"]
        assert max(abs(a - b) for a, b in zip(g["lps"], r["lps"], strict=True)) < LOGPROB_ATOL
        if r["prefill"] is not None:
            assert max(abs(a - b) for a, b in zip(g["prefill"], r["prefill"], strict=True)) < LOGPROB_ATOL


def test_world_sizes_2_4_8_serve_what_one_rank_serves(tp_dirs, tmp_path):
    """At 8 ranks Gemma's 4 KV heads are each replicated on two ranks; at 2 each rank holds two."""
    import torch.multiprocessing as mp

    dirs = {name: str(path) for name, path in tp_dirs.items()}
    single = {name: serve_workload(path, {"TGI_NPU_KV_CACHE_FRACTION": "0.002"}, 1)
              for name, path in dirs.items()}
    reference = {name: merged([single[name]], 1) for name in dirs}
    for ref in reference.values():  # ids 0-2 first, 3-4 joined after two decode steps
        assert {rid: len(r["ids"]) for rid, r in ref.items()} == {0: 10, 1: 6, 2: 9, 3: 7, 4: 8}
    for world_size in (2, 4, 8):
        out = tmp_path / f"ws{world_size}"
        out.mkdir()
        mp.spawn(_workload_worker, args=(world_size, free_port(), dirs, str(out)), nprocs=world_size)
        ranks = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world_size)]
        for name in dirs:
            per_rank = [r[name] for r in ranks]
            warmups = {r["warmup"] for r in per_rank}
            assert len(warmups) == 1, f"{name}: Warmup differs between ranks: {warmups}"
            assert_same_results(merged(per_rank, world_size), reference[name])


# ---- (b) two shard processes through the CLI, driven like the v3 router ------------------------
class MergingRouter(RouterSim):
    """RouterSim whose sharded calls also check what the real router takes on trust: identical
    Warmup/Info/FilterBatch answers and CachedBatch on every rank, and each request's Generation
    from exactly one rank (``id % world_size``), none missing, none duplicated."""

    def _all(self, method: str, request):
        resps = super()._all(method, request)
        if method in ("Warmup", "Info", "FilterBatch"):
            assert all(r == resps[0] for r in resps), f"{method} differs between ranks: {resps}"
        if method in ("Prefill", "Decode"):
            batches = [r.batch if r.HasField("batch") else None for r in resps]
            assert all(b == batches[0] for b in batches), f"{method}: CachedBatch differs: {batches}"
            if method == "Prefill":
                expected = [r.id for r in request.batch.requests]
            else:
                expected = [i for b in request.batches for i in b.request_ids]
            got = Counter()
            for rank, resp in enumerate(resps):
                for g in resp.generations:
                    assert g.request_id % len(resps) == rank, f"request {g.request_id} from rank {rank}"
                    got[g.request_id] += 1
            assert got == Counter(expected), f"{method}: generations {got}, expected one each of {expected}"
        return resps


def start_set(
    model_dir: Path, world_size: int, dist_timeout: float, extra_args: list[str] = ()
) -> tuple[str, list[subprocess.Popen]]:
    """``world_size`` shards as the launcher starts them (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, --sharded), all at once: rank 0's socket appears only after every rank joined."""
    uds = f"{tempfile.gettempdir()}/tgi-tp-{uuid.uuid4().hex[:8]}"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "TGI_NPU_DIST_TIMEOUT": str(dist_timeout)}
    extra = (["--sharded"] if world_size > 1 else []) + list(extra_args)
    with ThreadPoolExecutor(world_size) as pool:
        futures = [pool.submit(start_shard, model_dir, uds, extra_args=extra, env=env, rank=r,
                               world_size=world_size) for r in range(world_size)]
        procs = [f.result() for f in futures]
    return uds, procs


def stop_set(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def two_sets(tp_dirs):
    """The Gemma-2B-shaped checkpoint (one KV head, replicated) served by one shard and by two
    ranks; the two-rank set's peers give up on a silent peer after 8 s."""
    model_dir = tp_dirs["gemma_mqa"]
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(start_set, model_dir, 1, 60)
        two = pool.submit(start_set, model_dir, 2, 8)
        (uds1, procs1), (uds2, procs2) = one.result(), two.result()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
    single, sharded = RouterSim(f"{uds1}-0", tokenizer), MergingRouter(f"{uds2}-0", tokenizer)
    single.startup(max_input=256, max_prefill=256)
    sharded.startup(max_input=256, max_prefill=256)
    yield single, sharded, procs2
    stop_set(procs1 + procs2)


def mixed_workload(sim: RouterSim):
    specs = [
        dict(text="The quick brown fox", max_new_tokens=16, prefill_logprobs=True),
        dict(text="Hello 深度学习", max_new_tokens=10, top_n=3),
        dict(text="Once upon a time", max_new_tokens=20),  # cancelled at step 3
        dict(text="Pour déguster un ortolan, il faut tout d'abord", truncate=5, max_new_tokens=8),
        dict(text="def add(a, b):", max_new_tokens=9, ignore_eos=True),
        dict(text="Ascend NPU paged", max_new_tokens=12, do_sample=True, seed=42, temperature=0.8,
             top_k=50, top_p=0.95, repetition_penalty=1.3),
        dict(text="numbers 0 1 2 3", max_new_tokens=10, do_sample=True, seed=7, watermark=True,
             frequency_penalty=0.5, typical_p=0.9),
    ]
    reqs = []
    for spec in specs:
        spec = dict(spec)
        reqs.append(sim.request(spec.pop("text"), **spec))
    plan = {0: reqs[:3], 2: reqs[3:5], 4: reqs[5:]}

    def health(step):  # the router's health probe (id 2^64-1, block 0) between steps
        if step == 3:
            gens, batch = sim.health_probe()
            assert len(gens) == 1 and gens[0].request_id == U64_MAX and batch is None

    results = sim.run(plan, cancel={3: [reqs[2].id]}, between=health)
    return [results[r.id] for r in reqs]


def test_two_cli_shards_serve_what_one_serves(two_sets):
    single, sharded, _ = two_sets
    assert sharded.urls == [f"unix://{sharded.master_socket[:-2]}-{r}" for r in range(2)]
    assert (single.info.block_size, single.info.dtype) == (sharded.info.block_size, sharded.info.dtype)
    free = sharded.allocator.free_blocks
    expected, got = mixed_workload(single), mixed_workload(sharded)
    assert sharded.allocator.free_blocks == free, "every block came back"
    for i, (x, y) in enumerate(zip(got, expected, strict=True)):
        assert x.ids == y.ids and x.texts == y.texts, f"request {i}"
        assert (x.generated_text, x.finish_reason, x.seed) == (y.generated_text, y.finish_reason, y.seed)
        assert x.top_tokens == y.top_tokens
        assert max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs, strict=True)) < LOGPROB_ATOL
        assert (x.prefill is None) == (y.prefill is None)
    assert got[2].generated_text is None and len(got[2].ids) < 20  # the cancelled one
    assert got[5].seed == 42


def test_warmup_is_identical_on_both_ranks_and_repeatable(two_sets):
    _, sharded, _ = two_sets
    for max_input, max_total in ((40, 64), (None, None)):
        resps = sharded._all("Warmup", sharded.warmup_request(max_input, max_total, 128, None))
        assert resps[0] == resps[1]  # (MergingRouter checks it too)
        if max_input is not None:
            assert (resps[0].max_input_tokens, resps[0].max_total_tokens) == (max_input, max_total)
    sharded.max_input = resps[0].max_input_tokens
    sharded.allocator = BlockAllocator(resps[0].max_supported_total_tokens, sharded.info.block_size)


def wait_exit(proc: subprocess.Popen, within: float) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        code = proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the surviving rank was still running {within}s after its peer died")
    return code, time.monotonic() - start, proc.stderr.read()


def test_idle_rank_exits_when_its_peer_is_killed(two_sets):
    """kill -9 rank 1 while nothing is in flight: rank 0's watchdog notices within --dist-timeout
    (8 s here) and exits non-zero; it does not serve on, nor hang."""
    _, _, procs = two_sets
    os.kill(procs[1].pid, signal.SIGKILL)
    code, took, stderr = wait_exit(procs[0], within=30)
    assert code != 0 and "rank 1 sent no heartbeat" in stderr, stderr[-2000:]
    assert took < 20


def test_rank_in_a_collective_exits_when_its_peer_is_killed(tp_dirs):
    """kill -9 rank 1, then send rank 0 a Prefill: its first all-reduce fails at once, the RPC
    fails and rank 0 exits non-zero long before the (60 s) timeout."""
    uds, procs = start_set(tp_dirs["bloom"], 2, 60)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tp_dirs["bloom"], truncation_side="left")
        sim = RouterSim(f"{uds}-0", tokenizer)
        sim.startup(max_input=128, max_prefill=128)
        req = sim.request("The quick brown fox", max_new_tokens=4)
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
        with pytest.raises(grpc.RpcError) as info:
            sim.stubs[0].Prefill(pb.PrefillRequest(batch=sim.batch([req])), timeout=30)
        assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
        code, took, stderr = wait_exit(procs[0], within=30)
        assert code != 0 and "all_reduce failed on rank 0" in stderr + procs[0].stdout.read(), stderr[-2000:]
        assert took < 20
    finally:
        stop_set(procs)


# ---- startup refusals ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, overrides, world_size, needle",
    [
        ("bloom", dict(n_head=6, hidden_size=48), 4, "num_attention_heads = 6"),
        ("gemma", dict(num_attention_heads=12, num_key_value_heads=6, head_dim=8), 4, "num_key_value_heads = 6"),
        ("gemma", dict(vocab_size=510, num_attention_heads=4), 4, "vocab_size = 510"),
        ("gemma", dict(intermediate_size=130, num_attention_heads=4), 4, "intermediate_size = 130"),
    ],
)
def test_indivisible_dimensions_fail_at_startup_naming_them(arch, overrides, world_size, needle, tmp_path):
    """Through the CLI as the launcher runs it: exit status 1, the dimension and world size on
    stderr, before any rendezvous (no peer is started: the check must not wait for one)."""
    from tgi_npu_backend.demo import bloom_config, gemma_config

    overrides = dict(overrides)
    vocab = overrides.pop("vocab_size", 512)
    cfg = (bloom_config if arch == "bloom" else gemma_config)(vocab, **overrides)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    env = dict(os.environ, RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), TGI_NPU_DIST_TIMEOUT="30")
    res = subprocess.run(
        [sys.executable, "-m", "tgi_npu_backend.cli", "serve", str(tmp_path), "--sharded",
         "--uds-path", str(tmp_path / "s"), "--json-output"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode == 1, res.stderr
    assert needle in res.stderr and f"world size {world_size}" in res.stderr, res.stderr


def test_rank_whose_peers_never_come_exits_at_startup(tp_dirs, tmp_path):
    """Rank 0 of 2 started alone: the rendezvous gives up after --dist-timeout, naming the group."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "tgi_npu_backend.cli", "serve", str(tp_dirs["bloom"]), "--sharded",
         "--uds-path", str(tmp_path / "s"), "--dist-timeout", "3"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode == 1 and "could not join the gloo process group of 2 ranks" in res.stderr
    assert time.monotonic() - start < 30
    assert not os.path.exists(tmp_path / "s-0"), "no socket: the launcher must not think it ready"


# ---- (c) the NPU path (torch_npu emulation) at world size 2 ---------------------------------------
NEAR_TIE = 0.15  # nats between the top two tokens: half-precision reduction order may flip these


# logprob tolerance per dtype: bf16 rounds logits of ~10 to steps of 0.0625, fp16 to 0.0078
@pytest.mark.parametrize("name,dtype,atol", [("gemma_mqa", "bfloat16", 0.2), ("bloom", "float16", 0.05)])
def test_emulated_npu_two_ranks_serve_what_one_serves(tp_dirs, name, dtype, atol):
    """NpuBackend on both ranks (gloo carries the collectives of an emulated NPU set). In half
    precision the all-reduce sums in another order than one rank does, so: logprobs agree to
    half-precision accuracy, and greedy tokens are equal up to the first step where one rank's
    top two tokens were a near tie (a real TP bug changes tokens where the margin is clear)."""
    extra = ["--device", "npu-emulated", "--dtype", dtype]
    model_dir = tp_dirs[name]
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(start_set, model_dir, 1, 60, extra)
        two = pool.submit(start_set, model_dir, 2, 60, extra)
        (uds1, procs1), (uds2, procs2) = one.result(), two.result()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side="left")
        single, sharded = RouterSim(f"{uds1}-0", tokenizer), MergingRouter(f"{uds2}-0", tokenizer)
        single.startup(max_input=256, max_prefill=256)
        sharded.startup(max_input=256, max_prefill=256)
        assert single.info.device_type == sharded.info.device_type == "npu-emulated"
        assert single.info.block_size == sharded.info.block_size == 128
        texts = ["The quick brown fox", "Hello 深度学习", "def add(a, b):", "Once upon a time"]

        def run(sim):
            reqs = [sim.request(t, max_new_tokens=12, top_n=2, ignore_eos=True) for t in texts]
            res = sim.run({0: reqs[:2], 2: reqs[2:]})
            return [res[r.id] for r in reqs]

        equal_steps = 0
        for i, (x, y) in enumerate(zip(run(sharded), run(single), strict=True)):
            d = next((k for k, (a, b) in enumerate(zip(x.ids, y.ids)) if a != b), len(y.ids))
            equal_steps += d
            assert max((abs(a - b) for a, b in zip(x.logprobs[:d], y.logprobs[:d])), default=0) < atol
            if d < len(y.ids):
                top = sorted(y.top_logprobs[d], reverse=True)
                assert top[0] - top[1] < NEAR_TIE, f"request {i} step {d}: tokens differ at a clear margin"
        assert equal_steps >= 0.75 * 12 * len(texts), f"only {equal_steps} equal steps"
    finally:
        stop_set(procs1 + procs2)
    for p in procs1 + procs2:
        assert "reference (non-fused) path" not in p.stdout.read()
