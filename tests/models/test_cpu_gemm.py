"""The float32 CPU kernels (``models/layers/cpu_gemm.py``) against ``F.linear``, and the
measurement that chooses among them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tgi_npu_backend.models.layers import cpu_gemm
from tgi_npu_backend.models.layers.cpu_gemm import KERNELS, PACKED, PLAIN, SMALL_ROWS, GemmProfile
from tgi_npu_backend.models.layers.linear import linear

TOL = {"atol": 2e-5, "rtol": 1e-5}
NATIVE = cpu_gemm.native_available()  # device_kernels/cpu_gemm.c: AVX-512 CPUs with a C compiler


def runs_here(name: str) -> None:
    if name == "native" and not NATIVE:
        pytest.skip("the native CPU linear needs AVX-512 and a C compiler")


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("rows", [0, 1, 3, 32, SMALL_ROWS + 1, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_every_kernel_computes_f_linear(name, rows, bias):
    runs_here(name)
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 72, generator=g), torch.randn(136, 72, generator=g)
    b = torch.randn(136, generator=g) if bias else None
    out = KERNELS[name](x, w, b)
    assert out.shape == (rows, 136) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), **TOL)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_takes_strided_and_batched_rows(name):
    runs_here(name)
    w, b = torch.randn(40, 24), torch.randn(40)
    x = torch.randn(24, 7).t()  # [7, 24], not contiguous
    torch.testing.assert_close(KERNELS[name](x, w, b), F.linear(x, w, b), **TOL)
    x3 = torch.randn(2, 5, 24)
    out = KERNELS[name](x3, w, b)
    assert out.shape == (2, 5, 40)
    torch.testing.assert_close(out, F.linear(x3, w, b), **TOL)


def test_a_profile_runs_its_small_kernel_up_to_small_rows_and_its_large_one_above(monkeypatch):
    calls = []
    for name in ("swapped", "mkl"):
        monkeypatch.setitem(KERNELS, name, lambda x, w, b, n=name: calls.append((n, x.shape[0])) or F.linear(x, w, b))
    w = torch.randn(8, 4)
    for rows in (1, SMALL_ROWS, SMALL_ROWS + 1):
        linear(torch.randn(rows, 4), w, None, PLAIN)
    linear(torch.randn(3, 2, 4), w, None, PLAIN)  # rows are counted over the leading dims
    assert calls == [("swapped", 1), ("swapped", SMALL_ROWS), ("mkl", SMALL_ROWS + 1), ("swapped", 3)]
    calls.clear()
    linear(torch.randn(2, 4, dtype=torch.bfloat16), w.bfloat16(), None, PLAIN)  # float32 only
    assert calls == []
    one_row = GemmProfile(pack=False, small="swapped", large="mkl", one="mkl")
    for rows in (1, 2, SMALL_ROWS + 1):
        linear(torch.randn(rows, 4), w, None, one_row)
    assert calls == [("mkl", 1), ("swapped", 2), ("mkl", SMALL_ROWS + 1)]
    assert "swapped (mkl for one row) up to" in one_row.describe()


@pytest.mark.skipif(not NATIVE, reason="the native CPU linear needs AVX-512 and a C compiler")
@pytest.mark.parametrize("k", [1, 15, 16, 17, 1024, 1040])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 31])
def test_native_edges_against_float64(k, rows):
    """Every remainder of its tiles (rows by 4, weight rows by 6, or by 8 for one row; K by 16),
    weights and rows whose rows lie apart (a slice of a wider matrix, as a tensor-parallel shard's
    columns), a weight larger than a thread's share, against float64."""
    g = torch.Generator().manual_seed(k * 100 + rows)
    wide = torch.randn(6 * 11 + 5, k + 9, generator=g)
    w, x, b = wide[:, 3 : 3 + k], torch.randn(rows, k + 4, generator=g)[:, 2 : 2 + k], torch.randn(71, generator=g)
    assert w.stride(0) == k + 9 and x.stride(0) == k + 4
    for bias in (None, b):
        expected = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        out = KERNELS["native"](x, w, bias)
        assert out.shape == (rows, 71) and out.is_contiguous()
        torch.testing.assert_close(out.double(), expected, atol=1e-4 * max(1, k ** 0.5), rtol=1e-5)


def test_calibration_measures_each_kernel_and_chooses_among_them():
    cpu_gemm.calibrate.cache_clear()
    profile = cpu_gemm.calibrate(96, 64, repeats=1)
    assert profile.small in ("swapped", "onednn", "native") and profile.large in ("mkl", "onednn")
    assert ("32 rows" in profile.measured and " native " in profile.measured) == NATIVE
    assert profile.one in ("swapped", "onednn", "mkl", "native") and isinstance(profile.pack, bool)
    for needle in ("1 rows swapped", "32 rows swapped", "onednn", "packed", "1024 rows mkl", "on [96, 64]"):
        assert needle in profile.measured
    assert cpu_gemm.calibrate(96, 64, repeats=1) is profile  # once per shape and process
    assert "measured: 1 rows" in profile.describe()


def test_the_default_profile_is_todays_packed_onednn_path():
    assert PACKED == GemmProfile(pack=True, small="onednn", large="onednn")
    assert not PLAIN.pack and PLAIN.kernel(1) is KERNELS["swapped"] and PLAIN.kernel(500) is KERNELS["mkl"]
    assert "plain" in PLAIN.describe() and "packed into oneDNN" in PACKED.describe()


def test_the_head_profile_runs_its_head_kernel_for_a_decode_steps_rows_and_onednn_otherwise(monkeypatch):
    calls = []
    for name in ("swapped_chunks", "onednn"):
        monkeypatch.setitem(KERNELS, name, lambda x, w, b, n=name: calls.append((n, x.shape[0])) or F.linear(x, w, b))
    head = PLAIN.head_profile()
    w = torch.randn(8, 4)
    for rows in (1, 2, SMALL_ROWS, SMALL_ROWS + 1):
        linear(torch.randn(rows, 4), w, None, head)
    assert calls == [("onednn", 1), ("swapped_chunks", 2), ("swapped_chunks", SMALL_ROWS),
                     ("onednn", SMALL_ROWS + 1)]
    assert PACKED.head_profile().kernel(32) is KERNELS["onednn"]
    assert "the LM head swapped_chunks from 2" in PLAIN.describe()


def test_swapped_chunks_spans_chunk_boundaries(monkeypatch):
    """Vocabularies that are and are not a multiple of the chunk, and one shorter than a chunk."""
    monkeypatch.setattr(cpu_gemm, "HEAD_CHUNK", 16)
    x = torch.randn(5, 12)
    for n in (16, 48, 50, 7):
        w, b = torch.randn(n, 12), torch.randn(n)
        torch.testing.assert_close(cpu_gemm.swapped_chunks(x, w, b), F.linear(x, w, b), **TOL)
        torch.testing.assert_close(cpu_gemm.swapped_chunks(x, w), F.linear(x, w), **TOL)


def test_head_calibration_times_both_head_kernels_on_the_table_itself(monkeypatch):
    seen = []
    for name in ("swapped_chunks", "onednn"):
        monkeypatch.setitem(KERNELS, name, lambda x, w, b, n=name: seen.append((n, w)) or F.linear(x, w, b))
    table = torch.randn(300, 64)
    for name in ("mkl",):
        monkeypatch.setitem(KERNELS, name, lambda x, w, b, n=name: seen.append((n, w)) or F.linear(x, w, b))
    choice, one, measured = cpu_gemm.calibrate_head(table, repeats=2)
    assert choice in ("onednn", "swapped_chunks", "native")
    assert one in ("onednn", "mkl", "native")
    assert (" native " in measured) == NATIVE
    assert {n for n, _ in seen} == {"onednn", "swapped_chunks", "mkl"} and all(w is table for _, w in seen)
    assert measured.startswith("LM head [300, 64] at 32 rows onednn ") and "swapped_chunks" in measured
    assert "; at 1 rows onednn " in measured and " mkl " in measured.split("; at 1 rows")[1]


def test_the_head_profile_runs_the_measured_one_row_kernel(monkeypatch):
    calls = []
    for name in ("mkl", "onednn"):
        monkeypatch.setitem(KERNELS, name, lambda x, w, b, n=name: calls.append((n, x.shape[0])) or F.linear(x, w, b))
    head = GemmProfile(pack=False, head="onednn", head_one="mkl").head_profile()
    w = torch.randn(8, 4)
    for rows in (1, 2):
        linear(torch.randn(rows, 4), w, None, head)
    assert calls == [("mkl", 1), ("onednn", 2)]
    assert "(mkl for one row)" in GemmProfile(pack=False, head_one="mkl").describe()
