"""The CPU backend's native decode kernel (``device_kernels/cpu_decode.c``) against a float64 dense
oracle, at the head sizes it unrolls (64, 128, 256) and others, with the cases the PyTorch decode
sees plus its own: strided queries, one and two threads, bad block tables, a failed build."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tgi_npu_backend.kernels import cpu_native
from tgi_npu_backend.kernels.cpu import CpuBackend

HAS_CC = cpu_native.compiler() is not None
needs_kernel = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the PyTorch decode runs")


def _case(lens, heads, kv_heads, d, bs, seed, alibi, scattered=True):
    """Random caches with every sequence's blocks scattered over the pool and NaN in every slot
    no sequence holds (including the tails of the last blocks)."""
    g = torch.Generator().manual_seed(seed)
    counts = [math.ceil(n / bs) for n in lens]
    num_blocks = sum(counts) + 3
    ids = torch.randperm(num_blocks, generator=g).tolist() if scattered else list(range(num_blocks))
    tables, at = [], 0
    for c in counts:
        tables.append(ids[at: at + c])
        at += c
    width = max(counts)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    kc = torch.full((num_blocks, kv_heads, bs, d), float("nan"))
    vc = torch.full((num_blocks, kv_heads, bs, d), float("nan"))
    for t, n in zip(tables, lens):
        for p in range(n):
            kc[t[p // bs], :, p % bs] = torch.randn(kv_heads, d, generator=g)
            vc[t[p // bs], :, p % bs] = torch.randn(kv_heads, d, generator=g)
    q = torch.randn(len(lens), heads, d, generator=g) * 2
    slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)]) if alibi else None
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32), tables, slopes


def _oracle(q, kc, vc, tables, lens, scale, slopes):
    """Dense float64 attention of each query over its sequence's positions in order."""
    out = []
    heads, kv_heads = q.shape[1], kc.shape[1]
    bs = kc.shape[2]
    for b, (t, n) in enumerate(zip(tables, lens.tolist())):
        pos = torch.arange(n)
        k = kc[torch.tensor(t)[pos // bs], :, pos % bs].double()  # [n, KVH, D]
        v = vc[torch.tensor(t)[pos // bs], :, pos % bs].double()
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        if slopes is not None:
            s = s + slopes.double()[:, None] * (pos - (n - 1)).double()
        out.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v))
    return torch.stack(out)


@pytest.fixture(scope="module")
def kernel():
    if not HAS_CC:
        pytest.skip("no C compiler")
    k = cpu_native.decode_kernel()
    assert k is not None, "a C compiler is on PATH but the native decode kernel did not build"
    return k


@needs_kernel
@pytest.mark.parametrize("d", [64, 128, 256, 40])
@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("alibi", [False, True], ids=["rope", "alibi"])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_the_dense_oracle(kernel, d, kv_heads, alibi, threads):
    """Lengths inside, at the end of and past a block, one sequence and several; NaN in the
    unwritten slots never reaches the output."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens, bs in (([1, 15, 16, 17, 40], 16), ([200], 16), ([3, 130], 128)):
            q, kc, vc, table, sl, tables, slopes = _case(lens, 8, kv_heads, d, bs, seed=d + bs, alibi=alibi)
            scale = 1 / math.sqrt(d)
            out = kernel(q, kc, vc, table, sl, scale, slopes)
            assert out.shape == q.shape and torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), _oracle(q, kc, vc, tables, sl, scale, slopes),
                                       atol=2e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_strided_query_and_steep_alibi(kernel):
    """A query that is a view into a fused QKV output (rows 3x apart), and ALiBi slopes that put
    the far keys' scores below float32's exp underflow."""
    q, kc, vc, table, sl, tables, _ = _case([150, 40, 101], 4, 4, 64, 16, seed=3, alibi=False)
    fused = torch.randn(3, 3 * 4 * 64)
    fused[:, : 4 * 64] = q.reshape(3, -1)
    view = fused[:, : 4 * 64].view(3, 4, 64)
    assert not view.is_contiguous()
    steep = torch.tensor([2.0, 1.0, 0.5, 0.25])
    out = kernel(view, kc, vc, table, sl, 0.125, steep)
    torch.testing.assert_close(out.double(), _oracle(q, kc, vc, tables, sl, 0.125, steep),
                               atol=2e-6, rtol=1e-5)


@needs_kernel
def test_bad_block_table_is_an_error_not_a_crash(kernel):
    q, kc, vc, table, sl, tables, _ = _case([20, 5], 4, 4, 64, 16, seed=1, alibi=False)
    bad = table.clone()
    bad[1, 0] = kc.shape[0]  # one past the pool
    with pytest.raises(IndexError, match="decode sequence 1"):
        kernel(q, kc, vc, bad, sl, 0.125, None)
    too_long = sl.clone()
    too_long[0] = 16 * table.shape[1] + 1  # more tokens than its row has blocks
    with pytest.raises(IndexError, match="decode sequence 0"):
        kernel(q, kc, vc, table, too_long, 0.125, None)
    torch.testing.assert_close(kernel(q, kc, vc, table, sl, 0.125, None).double(),
                               _oracle(q, kc, vc, tables, sl, 0.125, None), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_shares_torchs_openmp_runtime(kernel):
    """One OpenMP runtime in the process: the kernel's threads are torch's pool, not a second one
    competing for the cores."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    """A compiler that fails: ``build`` raises with its output (``decode_kernel`` then logs it and
    the backend keeps the PyTorch decode); nothing half-written is left in the cache."""
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 3\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    with pytest.raises(RuntimeError, match="failed \\(3\\).*no input"):
        cpu_native.build(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@needs_kernel
def test_builds_once_into_the_cache(tmp_path):
    first = cpu_native.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_native.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@needs_kernel
def test_backend_uses_it_for_float32_caches_only(kernel):
    """``CpuBackend`` decodes a float32 cache with the kernel and a bfloat16 one with PyTorch ops
    (the kernel reads float32 only)."""
    assert CpuBackend().native is kernel and CpuBackend(native=False).native is None
    from tgi_npu_backend.kernels import AttentionMetadata, Phase

    calls = []
    backend = CpuBackend()
    backend.native = lambda *a: calls.append(a) or kernel(*a)
    q, kc, vc, _, _, tables, _ = _case([20, 5], 4, 4, 64, 16, seed=2, alibi=False,
                                            scattered=False)
    meta = AttentionMetadata.build(
        phase=Phase.DECODE, slot_mapping=[tables[0][19 // 16] * 16 + 3, tables[1][0] * 16 + 4],
        block_tables=tables, context_lens=[19, 4], query_lens=[1, 1], block_size=16,
        device=torch.device("cpu"))
    for dtype, native_calls in ((torch.float32, 1), (torch.bfloat16, 1)):
        prepared = backend.prepare(meta)
        out = backend.decode(q.to(dtype), kc.to(dtype), vc.to(dtype), prepared, 0.125, None)
        assert len(calls) == native_calls and out.dtype == dtype
    assert prepared.plan.attention is not None  # the bfloat16 pass built the PyTorch plan


def test_the_shard_setting_reaches_the_backend():
    """``TGI_NPU_CPU_ATTENTION=torch`` (ServerConfig.cpu_attention) gives a CPU backend without the
    kernel; ``auto`` one with it where it builds."""
    from tgi_npu_backend import device
    from tgi_npu_backend.load import backend_for

    cpu = device.select_platform("cpu", 0, None)
    assert backend_for(cpu, "torch").native is None
    assert (backend_for(cpu, "auto").native is not None) == HAS_CC
