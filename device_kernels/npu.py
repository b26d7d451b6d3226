"""Ascend NPU kernels through torch_npu's ATB and aclnn operators; the only module that calls them.

Contracts: torch-npu 2.13.0 (the ``npu`` extra's pin), ``op_plugin/atb/_atb_api_docs.py``,
``_op_plugin_docs.py`` and ``AtbOpsInterface.h``; ``npu_emulation/`` registers the same schemas
and validates the documented preconditions on CPU (``--device npu-emulated``). Which op for what:

* store_kv: ``_npu_reshape_and_cache`` (ND caches ``[blocks, block_size, kv_heads, D]``, int32
  slots), as vllm-ascend.
* decode: ``_npu_paged_attention`` (no mask); with ALiBi ``atb._npu_paged_attention_v2`` with
  ``mask_type=2`` and one bias row per query and head, ``[num_tokens, heads, 1, max_len]``.
* prefill without a cached prefix: ``_npu_flash_attention`` with a ``[S, S]`` causal mask; with
  ALiBi ``atb._npu_flash_attention_v2`` (``mask_type=2``), whose mask is
  ``[batch, heads, S, S]``. That mask is quadratic in the longest sequence *times the batch*, so
  the batch is cut into runs of sequences whose mask stays within one longest-sequence mask (see
  ``alibi_groups``); one long prompt with many short ones costs one ``[1, heads, S, S]`` mask,
  not ``B`` of them.
* prefill over a cached prefix (prefix caching): the paged decode ops again, one query row per
  prompt token. Their contract (``_npu_paged_attention_v2`` docs) indexes ``block_table`` and
  ``context_lens`` per query token, so token ``p`` of a sequence is a query over the sequence's
  blocks with context ``p + 1``: exact causal attention over prefix + chunk, on fused ops.
  ``atb._npu_flash_attention_prefix_v2`` would be faster for long chunks, but its contract needs
  block_size 128, head_dim <= 128, a 128-aligned prefix and a *compressed* mask whose layout the
  docs do not define; confirm it on a device before using it.
* Gemma's RMSNorm: ``npu_rms_norm`` / ``npu_add_rms_norm``; rotary: ``npu_rotary_mul`` ('half').

Anything the fused ops cannot take (float32 tensors) runs the inherited reference math; each such
fallback is logged once and reported to the observer (the emulation counts them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from loguru import logger
from torch import Tensor

from . import npu_masks as masks
from .base import AttentionMetadata, Phase, host_to_device, plan_of, with_plan
from .npu_masks import alibi_groups
from .npu_platform import FUSED_DTYPES, load_torch_npu, recommended_block_size
from .reference import ReferenceBackend


class NpuObserver(Protocol):
    """What the backend reports besides its results (the emulation implements it)."""

    def record_fallback(self, op: str, reason: str) -> None: ...

    def record_mask(self, name: str, tensor: Tensor) -> None: ...


class NpuBackend(ReferenceBackend):
    """torch_npu kernels; falls back to the inherited reference math only where no op fits."""

    name = "npu"

    def __init__(self, observer: NpuObserver | None = None) -> None:
        self.observer = observer
        self._fallbacks_logged: set[str] = set()
        # Causal masks depend only on (length, dtype): kept across steps.
        self._causal_masks: dict[tuple[int, torch.dtype], Tensor] = {}

    def block_size_for(self, head_dim: int) -> int:
        return recommended_block_size(head_dim)

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The pass's step inputs, the same for every layer: int32 slots, the host length
        tensors the ATB ops read, per-token block tables (built here), and masks (built by the
        first layer that needs them, keyed by dtype and head count: the slopes depend only on
        the head index, so every layer of one model passes equal slopes)."""
        prepared = with_plan(meta, {})
        self._host_lens(prepared)
        if meta.phase is Phase.DECODE or meta.has_prefix:
            self._token_tables(prepared)
        return prepared

    # --- KV cache -------------------------------------------------------------------------------

    def store_kv(
        self,
        key: Tensor,
        value: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
    ) -> None:
        if key_cache.dtype not in FUSED_DTYPES:
            self._fallback("store_kv", f"{key_cache.dtype} KV cache (ATB takes fp16/bf16)")
            return super().store_kv(key, value, key_cache, value_cache, meta)
        # NOTE: the runner never emits -1 ("don't store") slots on this path; the op's docs say
        # nothing about negative slots (op-plugin's golden skips them), so none are passed.
        # Slots must be unique (concurrent writes to one slot race on the device): when a
        # prefill pass maps two tokens to one slot (identical prompts sharing prefix-cache
        # blocks; both hold the same K/V there), only the first of each is stored.
        if meta.store_rows is not None:
            rows = self._cached(
                meta, ("store_rows",),
                lambda: host_to_device(key.device)(torch.tensor(meta.store_rows, dtype=torch.int64)),
            )
            key, value = key.index_select(0, rows), value.index_select(0, rows)
            slots = self._cached(
                meta, ("slots",), lambda: meta.slot_mapping.index_select(0, rows).to(torch.int32)
            )
        else:
            slots = self._cached(meta, ("slots",), lambda: meta.slot_mapping.to(torch.int32))
        load_torch_npu()._npu_reshape_and_cache(
            key.contiguous(), value.contiguous(), key_cache, value_cache, slots
        )

    # --- attention ------------------------------------------------------------------------------

    def prefill(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        alibi_slopes: Tensor | None,
    ) -> Tensor:
        if query.dtype not in FUSED_DTYPES:
            self._fallback("prefill", f"{query.dtype} activations (ATB takes fp16/bf16)")
            return super().prefill(
                query, key, value, key_cache, value_cache, meta, scale, alibi_slopes
            )
        if meta.phase is Phase.MIXED and alibi_slopes is None:
            return self._splitfuse(query, key_cache, value_cache, meta, scale)
        if meta.has_prefix:
            return self._paged_per_token(query, key_cache, value_cache, meta, scale, alibi_slopes)
        torch_npu = load_torch_npu()
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        heads, kv_heads = query.shape[1], key.shape[1]
        out = torch.empty_like(query)
        if alibi_slopes is None:
            torch_npu._npu_flash_attention(
                query=query,
                key=key,
                value=value,
                mask=self._causal_mask(meta.max_seqlen_k, query.dtype, query.device),
                seq_len=self._host_lens(meta),
                scale_value=scale,
                num_heads=heads,
                num_kv_heads=kv_heads,
                out=out,
            )
            return out
        cu = meta.cu_seqlens_q_list
        for start, stop in alibi_groups(meta.seq_lens_list):
            rows = slice(cu[start], cu[stop])
            lens = meta.seq_lens_list[start:stop]
            # kernel_type=0 + mask_type=2: the configuration of op-plugin's own ALiBi test.
            torch_npu.atb._npu_flash_attention_v2(
                query[rows],
                key[rows],
                value[rows],
                lens,
                mask=self._prefill_alibi_mask(
                    meta, len(lens), max(lens), alibi_slopes, query.dtype, query.device
                ),
                kernel_type=0,
                mask_type=2,
                scale_value=scale,
                num_heads=heads,
                num_kv_heads=kv_heads,
                out=out[rows],
            )
        return out

    def decode(
        self,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        alibi_slopes: Tensor | None,
    ) -> Tensor:
        if query.dtype not in FUSED_DTYPES:
            self._fallback("decode", f"{query.dtype} activations (ATB takes fp16/bf16)")
            return super().decode(query, key_cache, value_cache, meta, scale, alibi_slopes)
        return self._paged_per_token(query, key_cache, value_cache, meta, scale, alibi_slopes)

    def _splitfuse(
        self, query: Tensor, key_cache: Tensor, value_cache: Tensor, meta: AttentionMetadata,
        scale: float,
    ) -> Tensor:
        """A MIXED pass (chunked prefill: prompt chunks and decode tokens) in one ATB
        PagedAttention call (CALC_TYPE_SPEC / MASK_TYPE_SPEC): per sequence, its query tokens and
        its cached length including this pass; one additive mask row per query token over the
        absolute key positions. ALiBi passes keep the per-token path (the op takes no slopes)."""
        query = query.contiguous()
        out = torch.empty_like(query)
        load_torch_npu()._npu_paged_attention_splitfuse(
            query,
            key_cache,
            value_cache,
            meta.block_tables,
            self._host_lens(meta),
            self._splitfuse_mask(meta, query.dtype, query.device),
            self._cached(meta, ("qlens",), lambda: torch.tensor(meta.query_lens_list, dtype=torch.int32)),
            key_cache.shape[2],
            query.shape[1],
            scale,
            out,
        )
        return out

    def _splitfuse_mask(self, meta: AttentionMetadata, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self._cached(meta, ("splitfuse", dtype), lambda: self._observe_mask(
            "splitfuse", masks.splitfuse(meta.context_lens_list, meta.query_lens_list,
                                         meta.max_seqlen_k, dtype, device)))

    def _paged_per_token(
        self,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        alibi_slopes: Tensor | None,
    ) -> Tensor:
        """Paged attention with one query row per token: decode (one token per sequence) and
        prefill over a cached prefix (every token of the chunk, each with its own context)."""
        torch_npu = load_torch_npu()
        query = query.contiguous()
        heads, kv_heads = query.shape[1], key_cache.shape[2]
        table, lens, lens_list = self._token_tables(meta)
        out = torch.empty_like(query)
        if alibi_slopes is None:
            torch_npu._npu_paged_attention(
                query=query,
                key_cache=key_cache,
                value_cache=value_cache,
                num_kv_heads=kv_heads,
                num_heads=heads,
                scale_value=scale,
                block_table=table,
                context_lens=lens,
                out=out,
            )
            return out
        # The ALiBi mask is [rows, heads, 1, L]: rows per call are capped so that no mask
        # exceeds max(L, 1024) rows (a long chunk over a long prefix would otherwise need
        # T * heads * L; as in prefill, one mask stays within one longest-sequence mask).
        longest = max(lens_list)
        step = max(longest, 1024)
        for start in range(0, len(lens_list), step):
            stop = min(start + step, len(lens_list))
            torch_npu.atb._npu_paged_attention_v2(
                query[start:stop],
                key_cache,
                table[start:stop],
                lens_list[start:stop],
                value_cache=value_cache,
                mask=self._paged_alibi_mask(
                    meta, start, lens_list[start:stop], alibi_slopes, query.dtype, query.device
                ),
                num_kv_heads=kv_heads,
                num_heads=heads,
                scale_value=scale,
                mask_type=2,
                out=out[start:stop],
            )
        return out

    # --- Gemma's pointwise kernels --------------------------------------------------------------

    def rms_norm(self, x: Tensor, gamma: Tensor, eps: float) -> Tensor:
        if x.dtype not in FUSED_DTYPES:
            self._fallback("rms_norm", f"{x.dtype} activations")
            return super().rms_norm(x, gamma, eps)
        return load_torch_npu().npu_rms_norm(x, self._gamma(gamma, x.dtype), epsilon=eps)[0]

    def add_rms_norm(
        self, x: Tensor, residual: Tensor, gamma: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        if x.dtype not in FUSED_DTYPES:
            self._fallback("add_rms_norm", f"{x.dtype} activations")
            return super().add_rms_norm(x, residual, gamma, eps)
        y, _rstd, s = load_torch_npu().npu_add_rms_norm(
            x, residual, self._gamma(gamma, x.dtype), epsilon=eps
        )
        return y, s

    def rotary(
        self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor]:
        if query.dtype not in FUSED_DTYPES:
            self._fallback("rotary", f"{query.dtype} activations")
            return super().rotary(query, key, cos, sin)
        torch_npu = load_torch_npu()
        # npu_rotary_mul takes 4-D input: [T, H, D] -> [1, T, H, D] (BSND, B = 1) with cos/sin
        # [T, 1, D] -> [1, T, 1, D] (the documented 1S1D broadcast). NOTE: not [T, 1, H, D]:
        # the 'half' mode documents B < 1000, which a long prefill would exceed. Query and key
        # heads go in one call, [1, T, H + KVH, D]: a key alone with one KV head (MQA) would be
        # [1, T, 1, D], which also reads as BNSD with N = T (and T >= 1000 breaks N < 1000).
        r1, r2 = cos.unsqueeze(0), sin.unsqueeze(0)
        heads = query.shape[1]
        qk = torch.cat([query, key], dim=1).unsqueeze(0)
        out = torch_npu.npu_rotary_mul(qk, r1, r2, rotary_mode="half").squeeze(0)
        return out[:, :heads], out[:, heads:]

    # --- per-step inputs ------------------------------------------------------------------------

    def _fallback(self, op: str, reason: str) -> None:
        if self.observer is not None:
            self.observer.record_fallback(op, reason)
        if op not in self._fallbacks_logged:
            self._fallbacks_logged.add(op)
            logger.warning(f"NPU backend: {op} runs the reference (non-fused) path: {reason}")

    def _observe_mask(self, name: str, mask: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.record_mask(name, mask)
        return mask

    def _cached(self, meta: AttentionMetadata, key: tuple, build: Callable[[], Any]) -> Any:
        """This pass's input ``key`` from ``meta.plan`` (``prepare``'s), built on first use."""
        step: dict[tuple, Any] = plan_of(meta, self.name)
        if key not in step:
            step[key] = build()
        return step[key]

    @staticmethod
    def _gamma(gamma: Tensor, dtype: torch.dtype) -> Tensor:
        # NOTE: npu_rms_norm computes in float32 internally but takes gamma in the input's dtype:
        # (1 + w) is rounded once to fp16/bf16 (HF multiplies in float32; within half precision).
        return gamma.to(dtype)

    def _host_lens(self, meta: AttentionMetadata) -> Tensor:
        # NOTE: the ATB ops read lengths on the host (vllm-ascend passes a CPU int32 tensor).
        if meta.seq_lens_host is not None:
            return meta.seq_lens_host
        return self._cached(
            meta, ("lens",), lambda: torch.tensor(meta.seq_lens_list, dtype=torch.int32)
        )

    def _token_tables(self, meta: AttentionMetadata) -> tuple[Tensor, Tensor, list[int]]:
        """Per query token: its sequence's block-table row, and its context length (a host
        tensor and list: the ATB ops read lengths on the host)."""

        def build() -> tuple[Tensor, Tensor, list[int]]:
            if meta.phase is Phase.DECODE:  # one token per sequence: the sequences' own
                return meta.block_tables, self._host_lens(meta), list(meta.seq_lens_list)
            lens_list, owners = [], []
            for i, (ctx, q) in enumerate(zip(meta.context_lens_list, meta.query_lens_list)):
                lens_list += range(ctx + 1, ctx + q + 1)
                owners += [i] * q
            index = host_to_device(meta.block_tables.device)(torch.tensor(owners, dtype=torch.int64))
            table = meta.block_tables.index_select(0, index)
            return table, torch.tensor(lens_list, dtype=torch.int32), lens_list

        return self._cached(meta, ("token_tables",), build)

    def _causal_mask(self, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``masks.causal``, kept across steps: it depends only on S and the dtype."""
        key = (s, dtype)
        if key not in self._causal_masks:
            if len(self._causal_masks) > 32:
                self._causal_masks.clear()
            self._causal_masks[key] = self._observe_mask("causal", masks.causal(s, dtype, device))
        return self._causal_masks[key]

    def _prefill_alibi_mask(
        self, meta: AttentionMetadata, n: int, s: int, slopes: Tensor, dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        return self._cached(meta, ("alibi_prefill", dtype, slopes.shape[0], n, s), lambda: self._observe_mask(
            "alibi_prefill", masks.prefill_alibi(n, s, slopes, dtype, device)))

    def _paged_alibi_mask(
        self, meta: AttentionMetadata, first_row: int, lens: list[int], slopes: Tensor,
        dtype: torch.dtype, device: torch.device,
    ) -> Tensor:
        return self._cached(meta, ("alibi_paged", dtype, slopes.shape[0], first_row), lambda: self._observe_mask(
            "alibi_paged", masks.paged_alibi(lens, slopes, dtype, device)))
