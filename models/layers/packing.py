"""CPU weights reordered once, at load, into oneDNN's blocked layout (what Inductor's freezing
does with ``mkldnn._reorder_linear_weight``); ``linear.linear`` takes them as they are.

* Float decoder-block linears are packed in place of the plain weight (no second copy): bfloat16
  ones where the CPU has oneDNN's bfloat16 kernels; float32 ones when the model's ``GemmProfile``
  says so (``cpu_gemm.py``: measured on this machine for a large model, ``gemm_profile``). Every
  float decoder linear gets that profile's kernels for its plain float32 weight.
* The LM head is packed only in bfloat16: in place when untied; when tied to the embedding, which
  needs the plain rows, as a second, packed copy of the table (its bytes are reported, logged and
  counted in the weights the KV pool is sized after). A float32 head stays plain and runs with
  the profile's head kernels (``GemmProfile.head_profile``; ``auto`` times them on the table).
* Quantized layers (int8 kernels) and NPU weights are left alone.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .cpu_gemm import MODES, PACKED, PLAIN, GemmProfile, calibrate, calibrate_head
from .embedding import ParallelLMHead
from .linear import BF16_ONEDNN, ONEDNN_LINEAR, MergedColumnParallelLinear, RowParallelLinear

# NOTE: measured on the 2-core AVX-512 CPU this project benchmarks on (2 threads, float32, the 96
# decoder-block projections of BLOOM-560m, weights out of cache): packed weights run 32 rows in
# 134-144 ms against 224 ms as loaded, 512 rows in 1.47-1.62 s against 1.71 s, 1 row at the same
# speed (58-71 vs 60 ms, within the noise). The hint is the row count the layout is tuned for:
# 512 was as good as or better than 1 or 32 at every row count measured.
# The 250,880 x 1,024 LM head, 3 alternated runs: bfloat16 packed 27-31 ms at 1 row and 67 ms at
# 32 rows against 39 / 113 ms as loaded; float32 packed 54 / 99 ms against 45 / 141 ms (slower at
# 1 row, so the float32 head stays as it is).
PACK_HINT = 512


def packable(weight: Tensor) -> bool:
    """A plain CPU weight oneDNN's linear can take reordered: float32, or bfloat16 where the CPU
    has oneDNN's bfloat16 kernels (AVX-512 BF16 / AMX)."""
    return (
        ONEDNN_LINEAR
        and weight.device.type == "cpu"
        and not weight.is_mkldnn
        and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and BF16_ONEDNN))
    )


def pack(weight: Tensor) -> Tensor:
    """``weight`` [out, in] in oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT)


AUTO_MIN_BYTES = 64 * 2**20  # "auto" measures for float32 decoder weights from this size on


def _float32_cpu_weights(model: nn.Module) -> list[Tensor]:
    """The decoder linears' float32 weights that ``pack_cpu_weights`` could pack."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, (MergedColumnParallelLinear, RowParallelLinear))
        and m.method is None
        and m.weight is not None
        and m.weight.dtype == torch.float32
        and packable(m.weight)
    ]


def gemm_profile(model: nn.Module, mode: str = "auto") -> GemmProfile:
    """The float32 CPU kernels for ``model`` (``mode``, ``TGI_NPU_CPU_GEMM``): ``packed`` or
    ``plain`` as named; ``auto`` measures them (``cpu_gemm.calibrate``, on the shape of the
    largest decoder weight) when the float32 CPU decoder weights reach ``AUTO_MIN_BYTES``, and
    otherwise keeps ``PACKED``: a small model's speed hardly depends on it, and tests stay
    deterministic."""
    if mode not in MODES:
        raise ValueError(f"CPU GEMM mode {mode!r}: use one of {', '.join(MODES)}")
    weights = _float32_cpu_weights(model)
    if not weights or mode == "packed":  # none: no oneDNN, or nothing float32 on the CPU
        return PACKED
    if mode == "plain":
        return PLAIN
    if sum(w.numel() * 4 for w in weights) < AUTO_MIN_BYTES:
        return PACKED
    largest = max(weights, key=lambda w: w.numel())
    profile = calibrate(*largest.shape)
    table = _float32_cpu_head(model)
    if table is None:
        return profile
    head, head_one, measured = calibrate_head(table)
    return dataclasses.replace(
        profile, head=head, head_one=head_one,
        measured="; ".join(m for m in (profile.measured, measured) if m),
    )


def _float32_cpu_head(model: nn.Module) -> Tensor | None:
    """The LM head's table where it runs plain in float32 on the CPU (not packed, not quantized)."""
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and m.packed is None:
            table = m.table
            return table if table.dtype == torch.float32 and packable(table) else None
    return None


def pack_cpu_weights(model: nn.Module, gemm: GemmProfile = PACKED) -> tuple[int, int]:
    """Pack ``model``'s CPU weights as the module docstring says, once, after loading, and give
    its float decoder linears ``gemm``'s kernels.
    Returns (weights packed, bytes of the packed copies made beside a plain weight)."""
    packed, copy_bytes = 0, 0
    for m in model.modules():
        if isinstance(m, (MergedColumnParallelLinear, RowParallelLinear)):
            m.gemm = gemm
            w = m.weight
            wanted = w is not None and (gemm.pack or w.dtype != torch.float32)
            if m.method is None and wanted and packable(w):
                m.weight = nn.Parameter(pack(w.data), requires_grad=False)
                packed += 1
        elif isinstance(m, ParallelLMHead):  # see cpu_gemm's NOTE on the head
            m.gemm = gemm.head_profile()
            table = m.table
            if m.packed is not None or table.dtype != torch.bfloat16 or not packable(table):
                continue
            if m.tied is None:
                m.weight = nn.Parameter(pack(table.data), requires_grad=False)
            else:
                m.packed = pack(table.data)
                copy_bytes += table.numel() * table.element_size()
            packed += 1
    return packed, copy_bytes
