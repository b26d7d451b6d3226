"""Batch -> forward inputs (tokens, positions, attention metadata) -> the logits a step needs.

The LM head is applied only where logits are used: each request's last position, and every
prompt position only for requests that asked for prompt logprobs (and then in chunks, reduced to
the logprob of the next prompt token at once) — with a 250k vocabulary the LM head over every
prompt token costs more than the rest of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tgi_npu_backend.kernels import AttentionMetadata
from tgi_npu_backend.models.base import CausalLM

from .batch import Batch
from .kv_cache import KVCache

PROMPT_LOGPROB_CHUNK = 512  # prompt positions per LM-head call when computing prompt logprobs


@dataclass
class StepLogits:
    next_logits: Tensor  # [B, vocab] float32, logits of each request's last position
    # per request: logprob of prompt token p+1 at position p for this pass's positions
    # (the first entry is for the first computed position); None unless asked
    prompt_logprobs: list[Tensor | None]


class ModelRunner:
    def __init__(self, model: CausalLM, device: torch.device):
        self.model = model
        self.device = device

    def prepare(self, batch: Batch, block_size: int) -> tuple[Tensor, Tensor, AttentionMetadata]:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        query_lens: list[int] = []
        for r in batch.requests:
            query, start = r.next_query()
            tokens += query
            positions += range(start, start + len(query))
            slots += r.slots[start : start + len(query)]
            context_lens.append(start)
            query_lens.append(len(query))
        meta = AttentionMetadata.build(
            is_prefill=batch.is_prefill,
            slot_mapping=slots,
            block_tables=[r.blocks for r in batch.requests],
            context_lens=context_lens,
            query_lens=query_lens,
            block_size=block_size,
            device=self.device,
        )
        input_ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return input_ids, pos, meta

    @torch.inference_mode()
    def forward(self, batch: Batch, kv_cache: KVCache) -> StepLogits:
        input_ids, positions, meta = self.prepare(batch, kv_cache.block_size)
        hidden = self.model(input_ids, positions, kv_cache.caches, meta)  # [T, hidden]
        ends = meta.cu_seqlens_q[1:].long() - 1  # [B] last token of each sequence
        next_logits = self.model.compute_logits(hidden[ends])

        prompt_logprobs: list[Tensor | None] = []
        offsets = meta.cu_seqlens_q.tolist()
        for i, r in enumerate(batch.requests):
            if not (batch.is_prefill and r.prefill_logprobs):
                prompt_logprobs.append(None)
                continue
            start, end = offsets[i], offsets[i + 1]
            # position p predicts prompt token p+1; the last position predicts the first new token
            targets = input_ids[start + 1 : end]
            prompt_logprobs.append(self._token_logprobs(hidden[start : end - 1], targets))
        return StepLogits(next_logits=next_logits, prompt_logprobs=prompt_logprobs)

    def _token_logprobs(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """log p(targets[i] | position i) for ``hidden`` [n, h], chunked over positions."""
        out = []
        for s in range(0, hidden.shape[0], PROMPT_LOGPROB_CHUNK):
            logits = self.model.compute_logits(hidden[s : s + PROMPT_LOGPROB_CHUNK])
            logprobs = torch.log_softmax(logits, dim=-1)
            out.append(logprobs.gather(1, targets[s : s + PROMPT_LOGPROB_CHUNK, None]).squeeze(1))
        if not out:
            return torch.empty(0, dtype=torch.float32, device=hidden.device)
        return torch.cat(out)
