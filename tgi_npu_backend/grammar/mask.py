"""The grammar rows of a batch's logits masked in one batched device operation.

Per step, each grammar request's matcher writes its allowed tokens as bits into one host int32
row (``[G, W]``, W = ceil(tokenizer size / 32): 31 KiB per request at a 250k vocabulary), all
rows in one call that llguidance spreads over its own threads (Rust, without the GIL; 80% of
the host's cores, up to 32); no Python loop over tokens. The ``[G, W]`` words go to the device once
and expand there to a ``[G, V]`` boolean mask (on the CPU: numpy's bit unpacking, one pass), and
one ``torch.where`` sets every forbidden logit to ``-inf``.
Rows of requests without a grammar are never read or written.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from llguidance import LLExecutor
from torch import Tensor

from ..warpers import NEG_INF
from .state import GrammarState

_executor: LLExecutor | None = None
_executor_lock = threading.Lock()


def _parallel() -> LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = LLExecutor()
        return _executor


def unpack_on_host(words: Tensor) -> Tensor:
    """``[G, W]`` int32 host words -> ``[G, 32W]`` bool, bit ``t % 32`` of word ``t // 32`` is
    token ``t``: one pass of numpy's C bit unpacking (0/1 bytes are valid bools)."""
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)


def unpack_on_device(words: Tensor, bits: Tensor) -> Tensor:
    """The same on the words' device: little-endian int32 words read as bytes keep token order
    (x86_64, aarch64); ``bits`` is ``[1, 2, 4, ..., 128]`` uint8 on that device."""
    as_bytes = words.view(torch.uint8)  # [G, 4W]
    return ((as_bytes.unsqueeze(-1) & bits) != 0).view(words.shape[0], -1)  # [G, 32W]


class GrammarMasks:
    def __init__(self, rows: list[int], states: list[GrammarState], device: torch.device | str):
        """``rows``: the batch rows with a grammar, ``states`` their grammar states (one
        tokenizer: one bitmask width)."""
        if not rows or len(rows) != len(states):
            raise ValueError("GrammarMasks needs one GrammarState per grammar row (at least one)")
        words = {s.words for s in states}
        if len(words) != 1:
            raise ValueError(f"the grammar states of one batch have different widths {sorted(words)}")
        self.rows = rows
        self.states = states
        self.words = words.pop()
        self.device = torch.device(device)
        self.index = torch.tensor(rows, dtype=torch.int64, device=self.device)  # [G]
        self.bits = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=self.device)
        self.host = torch.zeros((len(rows), self.words), dtype=torch.int32)  # [G, W], reused

    def allowed(self, vocab: int) -> Tensor:
        """``[G, vocab]`` bool: the tokens each grammar row may choose next. Ids past the
        tokenizer's (padding logits) are never allowed."""
        self._fill_host()
        rows = len(self.rows)
        if self.device.type == "cpu":
            allowed = unpack_on_host(self.host)
        else:
            # NOTE: a blocking copy: the host rows are rewritten next step, and a non-blocking
            # copy from pageable memory may still be reading them on some devices
            allowed = unpack_on_device(self.host.to(self.device), self.bits)
        width = allowed.shape[1]
        if vocab <= width:
            return allowed[:, :vocab]
        pad = torch.zeros((rows, vocab - width), dtype=torch.bool, device=self.device)
        return torch.cat([allowed, pad], dim=1)

    def _fill_host(self) -> None:
        if len(self.states) == 1:
            self.states[0].fill(self.host[0])
            return
        matchers = []
        for j, state in enumerate(self.states):
            if state.broken:
                self.host[j].fill_(-1)
            else:
                matchers.append((state.matcher, j))
        if matchers:
            _parallel().unsafe_compute_mask_ptr(
                matchers, self.host.data_ptr(), self.words * 4, len(self.states)
            )
        for j in (~self.host.any(dim=1)).nonzero().flatten().tolist():
            self.states[j].dead_end(self.host[j])

    def __call__(self, scores: Tensor) -> Tensor:
        """``scores`` ``[B, V]`` float with every grammar row's forbidden tokens at ``-inf``
        (out of place; the other rows are copied bit for bit)."""
        allowed = self.allowed(scores.shape[1])  # [G, V]
        if len(self.rows) == scores.shape[0]:  # every row has a grammar: one pass
            return torch.where(allowed, scores, NEG_INF)
        masked = torch.where(allowed, scores.index_select(0, self.index), NEG_INF)  # [G, V]
        return scores.index_copy(0, self.index, masked)
