"""The additive masks ``npu.py`` hands to the ATB attention ops, built on the device: a pure
function of the pass's shapes each (``NpuBackend`` caches and reports them), and how a prefill
batch is cut so that ALiBi's per-sequence masks stay small (``alibi_groups``). Value conventions
and layouts are the ops' documented ones (op-plugin's goldens, vllm-ascend), cited per mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import host_to_device

# Masked-out score in the masks we build. NOTE: op-plugin's own fp16 ALiBi golden uses -10000 and
# the bf16 one -inf; a large finite value behaves like -inf after softmax and never makes NaN.
_MASKED = {torch.float16: -10000.0, torch.bfloat16: float("-inf")}


def alibi_groups(seq_lens: list[int]) -> list[tuple[int, int]]:
    """Cut a prefill batch into runs ``[start, stop)`` of sequences sharing one ALiBi mask.

    A run of ``n`` sequences whose longest is ``s`` needs an ``[n, heads, s, s]`` mask; a run is
    closed before ``n * s * s`` would exceed ``max(S_max ** 2, 4096)`` (S_max: the longest
    sequence of the pass). So every mask is at most one longest-sequence mask, and the masks of a
    step add up to at most ``S_max * total_tokens`` per head (each sequence contributes at most
    ``S_max * len``), where ``[B, heads, S_max, S_max]`` was ``B * S_max ** 2``.
    """
    budget = max(max(seq_lens, default=0) ** 2, 4096)
    groups: list[tuple[int, int]] = []
    start, longest = 0, 0
    for i, n in enumerate(seq_lens):
        grown = max(longest, n)
        if i > start and (i - start + 1) * grown * grown > budget:
            groups.append((start, i))
            start, grown = i, n
        longest = grown
    if seq_lens:
        groups.append((start, len(seq_lens)))
    return groups


def causal(s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[S, S]`` mask for ``_npu_flash_attention``, S = longest sequence of the pass.

    NOTE: value convention from vllm-ascend (attention_mask.py): fp16 masks hold float32-min
    (-inf once cast) above the diagonal, bf16 masks hold 1 there (the kernel treats a bf16
    mask as a boolean).
    """
    upper = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
    fill = torch.finfo(torch.float32).min if dtype == torch.float16 else 1.0
    return torch.zeros(s, s, device=device).masked_fill(upper, fill).to(dtype)


def prefill_alibi(n: int, s: int, slopes: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[n, heads, s, s]`` = slope * (j - i), masked above the diagonal.

    The kernel reads ``mask[b, :, :len_b, :len_b]`` and adds it to the scaled scores (golden
    of op-plugin's ``test_flash_attention_case_fa_encoder_nocache_bf16_alibi``). Without a
    prefix every sequence starts at position 0, so the ``n`` slices are equal; the op
    documents only this 4-D shape for ALiBi, hence the copy. ``alibi_groups`` bounds ``n*s*s``.
    """
    pos = torch.arange(s, device=device, dtype=torch.float32)
    bias = slopes.to(device, torch.float32)[:, None, None] * (pos[None, :] - pos[:, None])[None]
    upper = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
    bias = bias.masked_fill(upper, _MASKED[dtype]).to(dtype)
    return bias[None].expand(n, -1, -1, -1).contiguous()


def paged_alibi(lens: list[int], slopes: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[num_tokens, heads, 1, L]``: row ``slope * (j - (len_t - 1))`` for a query at position
    ``len_t - 1``; L = the longest context.

    MindIE passes one shared row ``slope * (j - (L - 1))``, equal up to a per-row constant,
    which softmax ignores. We use the also-documented per-query form so that the keys that
    matter (near the query) get biases near 0: in bf16 a shared row would store e.g. -500 +
    small for a sequence 1000 tokens shorter, where the bf16 step is 2. Entries
    ``j >= len_t`` are never read (the op stops at ``context_lens``).
    """
    pos = torch.arange(max(lens), device=device, dtype=torch.float32)
    last = host_to_device(device)(torch.tensor(lens, dtype=torch.float32)) - 1
    rel = pos[None, :] - last[:, None]  # [T, L]
    row = slopes.to(device, torch.float32)[None, :, None] * rel[:, None, :]  # [T, H, L]
    return row[:, :, None, :].to(dtype).contiguous()


def splitfuse(context_lens: list[int], query_lens: list[int], max_len: int, dtype: torch.dtype,
              device: torch.device) -> Tensor:
    """``[T, max_len]`` for a MIXED pass: 0 where key position <= the query token's position,
    masked above (op-plugin's splitfuse test: 0 / -10000)."""
    pos: list[int] = []
    for ctx, q in zip(context_lens, query_lens):
        pos += range(ctx, ctx + q)
    query_pos = host_to_device(device)(torch.tensor(pos, dtype=torch.int64))
    keys = torch.arange(max_len, device=device)
    mask = torch.zeros(len(pos), max_len, device=device)
    return mask.masked_fill(keys[None, :] > query_pos[:, None], _MASKED[dtype]).to(dtype)
