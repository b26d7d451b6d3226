"""CPU weights packed into oneDNN's layout at load (``models/layers/packing.py``): which ones, and
that a packed model computes what the plain one does."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from prompt_pass import prompt_logits
from tgi_npu_backend.kernels import get_backend
from tgi_npu_backend.models.layers.cpu_gemm import PACKED, PLAIN, GemmProfile, native_available
from tgi_npu_backend.models.layers.linear import (
    BF16_ONEDNN,
    MergedColumnParallelLinear,
    RowParallelLinear,
    linear,
)
from tgi_npu_backend.models.layers.packing import gemm_profile, pack, pack_cpu_weights, packable
from tgi_npu_backend.models.layers.quant import detect
from tgi_npu_backend.models.layers.quant.methods import weight_bytes
from tgi_npu_backend.models.registry import load_model

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not BF16_ONEDNN, reason="no oneDNN bfloat16 kernels on this CPU")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 32, 600])
def test_a_packed_weight_computes_the_plain_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(160, 64, generator=g).to(dtype), torch.randn(160, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    packed = pack(w)
    assert packed.is_mkldnn and not packable(packed)
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 1.6e-2}
    torch.testing.assert_close(linear(x, packed, b), F.linear(x, w, b), **tol)
    torch.testing.assert_close(linear(x[::2], packed), F.linear(x[::2], w), **tol)  # strided rows


def test_half_and_npu_weights_are_not_packable():
    assert not packable(torch.zeros(4, 4, dtype=torch.float16))
    assert not packable(torch.zeros(4, 4, dtype=torch.int8))


def _load(model_dir, dtype, monkeypatch=None):
    """The model as load_model builds it; with ``monkeypatch``, without packing (the oracle)."""
    def build():
        return load_model(model_dir, dtype=dtype, device=CPU, backend=get_backend(CPU))

    if monkeypatch is None:
        return build()
    with monkeypatch.context() as m:
        m.setattr("tgi_npu_backend.models.registry.pack_cpu_weights", lambda model, gemm: (0, 0))
        return build()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", ["bloom_dir", "gemma_mqa_dir"])
def test_a_loaded_model_is_packed_and_computes_the_same_logits(ckpt, dtype, request, monkeypatch):
    model_dir = request.getfixturevalue(ckpt)
    plain = _load(model_dir, dtype, monkeypatch)
    model = _load(model_dir, dtype)
    blocks = [m for m in model.modules() if isinstance(m, MergedColumnParallelLinear)]
    assert blocks and all(m.weight.is_mkldnn for m in blocks)
    head, table = model.lm_head, model.lm_head.tied.weight  # both tiny checkpoints tie the head
    assert not table.is_mkldnn  # the embedding reads plain rows
    if dtype == torch.bfloat16:  # a packed copy for the head, counted in the weights' bytes
        assert head.packed is not None
        assert weight_bytes(model) == weight_bytes(plain) + table.numel() * table.element_size()
    else:  # float32: the head stays as it is (slower packed at one row)
        assert head.packed is None and weight_bytes(model) == weight_bytes(plain)
    ids = [5, 17, 3, 99, 42, 7, 64, 12]
    ours, ref = prompt_logits(model, ids), prompt_logits(plain, ids)
    scale = float(ref.abs().max())
    err = float((ours - ref).abs().max()) / scale
    assert err < (1e-5 if dtype == torch.float32 else 3e-2), f"{ckpt} {dtype}: {err:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)) or dtype == torch.bfloat16


@pytest.mark.parametrize("ckpt", ["bloom_dir", "gemma_mqa_dir"])
def test_a_model_loaded_plain_runs_the_plain_kernels_and_computes_the_same_logits(ckpt, request):
    model_dir = request.getfixturevalue(ckpt)
    packed = _load(model_dir, torch.float32)
    model = load_model(model_dir, dtype=torch.float32, device=CPU, backend=get_backend(CPU),
                       cpu_gemm="plain")
    linears = [m for m in model.modules() if isinstance(m, (MergedColumnParallelLinear, RowParallelLinear))]
    assert linears and all(not m.weight.is_mkldnn and m.gemm is PLAIN for m in linears)
    # the head's logits at 8 rows come from swapped_chunks (cpu_gemm's HEAD_CHUNK, in chunks)
    assert model.lm_head.gemm == PLAIN.head_profile() and model.lm_head.gemm.kernel(8).__name__ == "swapped_chunks"
    for ids in ([5, 17, 3, 99, 42, 7, 64, 12], [9]):  # a large pass and a one-row one
        ours, ref = prompt_logits(model, ids), prompt_logits(packed, ids)
        err = float((ours - ref).abs().max()) / float(ref.abs().max())
        assert err < 1e-5, f"{ckpt} {len(ids)} tokens: {err:.2e}"


@pytest.mark.skipif(not native_available(), reason="the native CPU linear needs AVX-512 and a C compiler")
@pytest.mark.parametrize("ckpt", ["bloom_dir", "gemma_mqa_dir"])
def test_a_model_whose_profile_chose_the_native_kernel_computes_the_same_logits(ckpt, request, monkeypatch):
    """What ``auto`` gives where the native linear measures fastest (decoder and head alike)."""
    model_dir = request.getfixturevalue(ckpt)
    packed = _load(model_dir, torch.float32)
    native = GemmProfile(pack=False, small="native", large="mkl", one="native", head="native",
                         head_one="native")
    monkeypatch.setattr("tgi_npu_backend.models.registry.gemm_profile", lambda model, mode: native)
    model = load_model(model_dir, dtype=torch.float32, device=CPU, backend=get_backend(CPU))
    linears = [m for m in model.modules() if isinstance(m, (MergedColumnParallelLinear, RowParallelLinear))]
    assert linears and all(m.gemm is native for m in linears)
    assert model.lm_head.gemm.kernel(8).__name__ == "native" == model.lm_head.gemm.kernel(1).__name__
    for ids in ([5, 17, 3, 99, 42, 7, 64, 12], [9]):  # rows of a decode step, and one row
        ours, ref = prompt_logits(model, ids), prompt_logits(packed, ids)
        err = float((ours - ref).abs().max()) / float(ref.abs().max())
        assert err < 1e-5, f"{ckpt} {len(ids)} tokens: {err:.2e}"


def test_auto_keeps_a_small_model_packed_and_measures_a_large_one(bloom_dir, monkeypatch):
    model = _load(bloom_dir, torch.float32)
    plain_model = load_model(bloom_dir, dtype=torch.float32, device=CPU, backend=get_backend(CPU),
                             cpu_gemm="plain")
    assert gemm_profile(plain_model, "auto") is PACKED  # a few MiB of weights: nothing measured
    assert gemm_profile(plain_model, "packed") is PACKED
    assert gemm_profile(plain_model, "plain") is PLAIN
    assert gemm_profile(model, "auto") is PACKED  # packed already: no float32 plain weights left
    shapes, tables = [], []
    monkeypatch.setattr("tgi_npu_backend.models.layers.packing.AUTO_MIN_BYTES", 0)
    monkeypatch.setattr("tgi_npu_backend.models.layers.packing.calibrate",
                        lambda *shape: shapes.append(shape) or PLAIN)
    monkeypatch.setattr("tgi_npu_backend.models.layers.packing.calibrate_head",
                        lambda table: tables.append(table) or ("onednn", "mkl", "LM head timed"))
    profile = gemm_profile(plain_model, "auto")
    assert profile == dataclasses.replace(PLAIN, head="onednn", head_one="mkl", measured="LM head timed")
    linears = (MergedColumnParallelLinear, RowParallelLinear)
    largest = max((m.weight for m in plain_model.modules() if isinstance(m, linears)),
                  key=lambda w: w.numel())
    assert shapes == [tuple(largest.shape)]
    # the head is timed on its own (tied) table, not on a copy
    assert len(tables) == 1 and tables[0] is plain_model.lm_head.tied.weight
    with pytest.raises(ValueError, match="use one of auto, packed, plain"):
        gemm_profile(plain_model, "fastest")


@needs_bf16
def test_int8_layers_are_left_to_their_kernels(bloom_dir):
    model = load_model(bloom_dir, dtype=torch.bfloat16, device=CPU, backend=get_backend(CPU),
                       quant=detect(bloom_dir, "eetq"))
    linears = [m for m in model.modules() if hasattr(m, "method") and m.method is not None]
    assert linears and all(m.weight is None or not m.weight.is_mkldnn for m in linears)
    assert model.lm_head.packed is not None  # the float LM head is still packed
    assert pack_cpu_weights(model) == (0, 0)  # once only
