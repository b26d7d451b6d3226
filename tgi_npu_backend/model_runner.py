"""Batch -> forward inputs (tokens, positions, attention metadata) -> the logits a step needs.

The LM head is applied only where logits are used: each request's last position, and every
prompt position only for requests that asked for prompt logprobs (and then in chunks, reduced to
the logprob of the next prompt token at once) — with a 250k vocabulary the LM head over every
prompt token costs more than the rest of the model.

Decode steps are built incrementally: a decoding batch keeps its block table and positions on
the host (numpy) and the token ids its last step chose on the device (``DecodeInputs``); each
step moves every request one position on with a few ``[B]``-sized numpy ops and copies the
positions, slots and lengths to the device (vLLM's input batch works the same way). Nothing is
rebuilt from the requests' Python lists unless the batch changed (prefill, filter,
concatenate), and no step reads a device tensor back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tgi_npu_backend.kernels import AttentionBackend, AttentionMetadata, Phase
from tgi_npu_backend.kernels.base import host_to_device, padded_block_table
from tgi_npu_backend.models.base import CausalLM

from .batch import Batch
from .request import Request
from .kv_cache import KVCache

PROMPT_LOGPROB_CHUNK = 512  # prompt positions per LM-head call when computing prompt logprobs


@dataclass
class StepLogits:
    next_logits: Tensor  # [Y, vocab] float32, last-position logits of the Y requests that yield
    # per request: logprob of prompt token p+1 at position p for this pass's prompt positions
    # (the first entry is for the chunk's first position); None unless asked
    prompt_logprobs: list[list[float] | None]


@dataclass(slots=True)
class DecodeInputs:
    """A decoding batch's step inputs, carried from one step to the next.

    The positions and the block table stay on the host (numpy): each step's positions, slots and
    lengths come from a handful of ``[B]``-sized numpy operations and go to the device as four
    small host-to-device copies; only the token ids stay on the device (the last step's choice).

    ``requests`` is the batch's own list object: a filtered or concatenated batch has a new list,
    and gets new inputs. ``first_len`` (``len(tokens)`` of the first request when the step was
    built) catches a step whose tokens were never appended.
    """

    requests: list[Request]
    block_tables: Tensor  # [B, max_blocks] int32 (device), fixed for the batch's life
    table: np.ndarray  # the same on the host, int64
    rows: np.ndarray  # [B] int64, 0..B-1
    positions: np.ndarray  # [B] int64, position of each request's token in this step
    max_seq_len: int  # max(positions) + 1
    cu_seqlens_q: Tensor  # [B + 1] int32 (device), 0..B
    query_lens: list[int]  # [1] * B
    first_len: int
    input_ids: Tensor  # [B] int64 (device), this step's tokens
    next_ids: Tensor | None = None  # [B] int64 (device), the tokens this step chose

    def advanced(self) -> DecodeInputs:
        """The next step's inputs: one position on, the chosen tokens as input."""
        assert self.next_ids is not None
        return DecodeInputs(
            requests=self.requests,
            block_tables=self.block_tables,
            table=self.table,
            rows=self.rows,
            positions=self.positions + 1,
            max_seq_len=self.max_seq_len + 1,
            cu_seqlens_q=self.cu_seqlens_q,
            query_lens=self.query_lens,
            first_len=self.first_len + 1,
            input_ids=self.next_ids,
        )

    def metadata(self, block_size: int) -> tuple[Tensor, AttentionMetadata]:
        """This step's positions (on the device) and attention metadata."""
        pos = self.positions
        seq_lens = pos + 1
        block, offset = np.divmod(pos, block_size)
        slots = self.table[self.rows, block] * block_size + offset
        device = self.input_ids.device
        upload = host_to_device(device)
        seq_lens_host = torch.from_numpy(seq_lens.astype(np.int32))
        return upload(torch.from_numpy(pos)), AttentionMetadata(
            phase=Phase.DECODE,
            slot_mapping=upload(torch.from_numpy(slots)),
            block_tables=self.block_tables,
            seq_lens=upload(seq_lens_host),
            context_lens=upload(torch.from_numpy(pos.astype(np.int32))),
            cu_seqlens_q=self.cu_seqlens_q,
            max_seqlen_q=1,
            max_seqlen_k=self.max_seq_len,
            block_size=block_size,
            seq_lens_list=seq_lens.tolist(),
            context_lens_list=pos.tolist(),
            query_lens_list=self.query_lens,
            seq_lens_host=seq_lens_host,
        )


def phase_of(batch: Batch) -> Phase:
    prefilling = [not r.prefilled for r in batch.requests]
    if not any(prefilling):
        return Phase.DECODE
    return Phase.PREFILL if all(prefilling) else Phase.MIXED


class ModelRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, device: torch.device):
        self.model = model
        self.backend = backend
        self.device = device
        self._decode: DecodeInputs | None = None  # the last decode step's inputs

    def build_inputs(self, batch: Batch, block_size: int) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """Inputs of a step built from the requests (every pass with prompt tokens; a decode whose
        batch changed)."""
        phase = phase_of(batch)
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
            phase=phase,
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

    def decode_inputs(
        self, batch: Batch, block_size: int
    ) -> tuple[DecodeInputs, Tensor, AttentionMetadata]:
        """This decode step's inputs (and its positions and metadata): the last step's advanced
        when it was this batch's, else built from the requests."""
        last, reqs = self._decode, batch.requests
        if (
            last is not None
            and last.requests is reqs
            and last.next_ids is not None
            and len(reqs[0].tokens) == last.first_len + 1
        ):
            step = last.advanced()
            positions, meta = step.metadata(block_size)
            return step, positions, meta
        input_ids, positions, meta = self.build_inputs(batch, block_size)
        step = DecodeInputs(
            requests=reqs,
            block_tables=meta.block_tables,
            # the host copy of the table ``build`` uploaded (rebuilt: on an accelerator the
            # metadata holds only the device one; a batch change is rare)
            table=padded_block_table([r.blocks for r in reqs]).astype(np.int64),
            rows=np.arange(len(reqs)),
            positions=np.array(meta.context_lens_list, dtype=np.int64),  # decode: position = context
            max_seq_len=meta.max_seqlen_k,
            cu_seqlens_q=meta.cu_seqlens_q,
            query_lens=meta.query_lens_list,
            first_len=len(reqs[0].tokens),
            input_ids=input_ids,
        )
        return step, positions, meta

    def forward(self, batch: Batch, kv_cache: KVCache) -> StepLogits:
        if torch.is_inference_mode_enabled():  # the server's generator thread (server.py)
            return self._forward(batch, kv_cache)
        with torch.inference_mode():
            return self._forward(batch, kv_cache)

    def _forward(self, batch: Batch, kv_cache: KVCache) -> StepLogits:
        if batch.prefilling:
            input_ids, positions, meta = self.build_inputs(batch, kv_cache.block_size)
            step = None
        else:
            step, positions, meta = self.decode_inputs(batch, kv_cache.block_size)
            input_ids = step.input_ids
        meta = self.backend.prepare(meta)  # once per pass, read by every layer
        hidden = self.model(input_ids, positions, kv_cache.caches, meta)  # [T, hidden]
        # kept only once the forward pass ran: a Decode that fails is retried from the same inputs
        self._decode = step
        if step is not None:  # one token per request: every position is a last position
            return StepLogits(self.model.compute_logits(hidden), [None] * len(batch))
        offsets = meta.cu_seqlens_q_list
        requests = batch.requests
        ends = [offsets[i + 1] - 1 for i, r in enumerate(requests) if r.yields_token]
        next_logits = self.model.compute_logits(hidden[ends]) if ends else hidden.new_empty((0,))

        prompt_logprobs: list[list[float] | None] = []
        for i, r in enumerate(requests):
            if r.prefilled or not r.prefill_logprobs:
                prompt_logprobs.append(None)
                continue
            start, end = offsets[i], offsets[i + 1]
            # position p predicts prompt token p+1; a last chunk's last position predicts the
            # first new token instead, and a middle chunk's the next chunk's first prompt token
            targets = r.tokens[r.cursor + 1 : min(r.cursor + r.chunk + 1, r.prompt_len)]
            rows = hidden[start : start + len(targets)]
            target_ids = torch.tensor(targets, dtype=torch.int64, device=hidden.device)
            prompt_logprobs.append(self._token_logprobs(rows, target_ids).tolist())
        return StepLogits(next_logits=next_logits, prompt_logprobs=prompt_logprobs)

    def choose(self, batch: Batch, rows: list[int], logits: Tensor) -> tuple[Tensor, Tensor]:
        """The token chooser of the requests at ``rows`` (those this pass yields a token for) on
        their ``logits``; in a decode pass the chosen ids (still on the device) become the next
        step's input."""
        requests = batch.requests
        if len(rows) == len(requests):
            chooser = batch.chooser
        else:  # some requests are mid-prompt: their generators must not draw
            chooser = batch.chooser.rows(rows)
        history = [requests[i].tokens for i in rows] if chooser.uses_history else None
        next_ids, logprobs = chooser(logits, history)
        if self._decode is not None and self._decode.requests is requests:
            self._decode.next_ids = next_ids
        return next_ids, logprobs

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
