"""Logit warpers with per-row parameters (HF/TGI top-k, top-p, typical-p), vectorised over a
batch: each takes ``scores`` ``[B, V]`` and per-row ``[B, 1]`` parameters plus an ``on`` mask, and
leaves rows whose request does not use the warper untouched."""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def top_k(scores: Tensor, top_k: Tensor, on: Tensor, max_top_k: int) -> Tensor:
    """HF TopKLogitsWarper per row (min_tokens_to_keep=1); ``top_k``/``on``: ``[B, 1]``."""
    vocab = scores.shape[-1]
    kth_index = top_k.clamp(min=1, max=vocab) - 1  # [B, 1]
    top_values = torch.topk(scores, min(max_top_k, vocab), dim=-1).values  # [B, k_max]
    kth = top_values.gather(1, kth_index)  # [B, 1]
    return scores.masked_fill((scores < kth) & on, NEG_INF)


def top_p(scores: Tensor, top_p_opposite: Tensor, on: Tensor) -> Tensor:
    """HF TopPLogitsWarper per row: drop the lowest tokens whose cumulative probability is
    ``<= 1 - top_p``, always keeping the most likely one; ``top_p_opposite``/``on``: ``[B, 1]``."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)  # [B, V] ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    sorted_remove = cumulative <= top_p_opposite
    sorted_remove[:, -1] = False  # min_tokens_to_keep = 1
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)  # back to vocab order
    return scores.masked_fill(remove & on, NEG_INF)


def typical(scores: Tensor, mass: Tensor, on: Tensor) -> Tensor:
    """HF TypicalLogitsWarper per row (Meister et al. 2022); ``mass``/``on``: ``[B, 1]``."""
    normalized = torch.log_softmax(scores, dim=-1)  # [B, V]
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)  # [B, 1]
    shifted = torch.abs(-normalized - entropy)  # [B, V] distance from the expected surprise
    sorted_shifted, sorted_indices = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    last = (cumulative < mass).sum(dim=1, keepdim=True).clamp(max=scores.shape[-1] - 1)  # [B, 1]
    sorted_remove = sorted_shifted > sorted_shifted.gather(1, last)
    sorted_remove[:, :1] = False  # min_tokens_to_keep = 1
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    return scores.masked_fill(remove & on, NEG_INF)
