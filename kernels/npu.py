"""Ascend NPU attention through torch_npu's ATB operators; the only module that imports torch_npu.

Which operator for which case (signatures and limits: shared/npu/NPU_NOTES.md 3.2-3.4, torch_npu
2.13 ``op_plugin/atb/_atb_api_docs.py``; none of this was run on hardware):

* store_kv: ``torch_npu._npu_reshape_and_cache`` (ND caches, int32 slots), as vllm-ascend v0.7.3.
* decode: ``torch_npu._npu_paged_attention`` (BSND, no mask); with ALiBi
  ``torch_npu.atb._npu_paged_attention_v2(mask_type=2)`` with one bias row per sequence and head.
* prefill without a cached prefix: ``torch_npu._npu_flash_attention`` (causal mask); with ALiBi
  ``torch_npu.atb._npu_flash_attention_v2(mask_type=2)`` with a ``[B, heads, S, S]`` bias+causal
  mask. Both take the packed ``[T, heads, D]`` layout plus per-sequence lengths, like our protocol.
  We prefer that to ``npu_prompt_flash_attention``/``npu_fused_infer_attention_score`` with
  ``pse_shift``: those accept pse only in BSH/BNSD (not TND), so a ragged batch would have to be
  padded; SelfAttention with MASK_TYPE_ALIBI is also what MindIE runs for BLOOM.
* prefill with a cached prefix, and float32 caches (the ATB ops take fp16/bf16 only): the
  reference math on NPU tensors. The fused prefix op ``_npu_flash_attention_prefix_v2`` needs the
  prefix 128-aligned, block_size 128 and head_dim <= 128, which TGI's prefix cache cannot promise.

Cache layout is the reference one (ND, ``[blocks, block_size, kv_heads, D]``, A2/A3); 310P NZ
caches are not supported. Negative (-1) slots are passed through to ``_npu_reshape_and_cache``
unfiltered (its docs say nothing about them): the runner should not emit them on NPU.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import Tensor

from .base import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, AttentionMetadata
from .reference import ReferenceBackend

_FUSED_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def npu_available() -> bool:
    """True when torch_npu imports and sees a device.

    NOTE: with torch-npu installed but no CANN, ``import torch_npu`` raises ImportError
    (libhccl.so) and, through the ``torch.backends`` autoload entry point, RuntimeError
    (NPU_NOTES 3.1). We never set TORCH_DEVICE_BACKEND_AUTOLOAD: if autoload is on and broken,
    ``import torch`` itself has already failed; if it is off, the explicit import below is the
    only place torch_npu loads, and any failure means "no NPU".
    """
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available())
    except (ImportError, RuntimeError, OSError, AttributeError):
        return False


def recommended_block_size(head_dim: int) -> int:
    """Largest valid block size with ``block_size * head_dim <= 128 * 128``.

    128 for head_dim <= 128, 64 for Gemma's 256. NOTE: the paged-attention docs require
    ``block_size * head_size <= 128*128`` on 310P and in quantized/parallel-decoding modes, and
    MindIE runs Gemma with block_size 64; plain fp16/bf16 decode on A2 would accept 128 too.
    """
    size = min(MAX_BLOCK_SIZE, (128 * 128 // head_dim) // MIN_BLOCK_SIZE * MIN_BLOCK_SIZE)
    if size < MIN_BLOCK_SIZE:
        raise ValueError(f"head_dim {head_dim} is too large for the NPU paged-attention ops")
    return size


def _torch_npu() -> Any:
    import torch_npu

    return torch_npu


class NpuBackend(ReferenceBackend):
    """torch_npu kernels; falls back to the inherited reference math where no op fits."""

    name = "npu"

    def __init__(self) -> None:
        # Masks and host lengths are the same for every layer of a step: build them once per
        # AttentionMetadata (held by reference, so ``is`` identifies the step). NOTE: ALiBi masks
        # are keyed by dtype and head count only: slopes depend only on the head index, so every
        # layer of one model passes equal slopes (often distinct tensors; comparing them would
        # cost a device sync per layer). One NpuBackend serves one model.
        self._step_meta: AttentionMetadata | None = None
        self._step_cache: dict[tuple, Tensor] = {}

    def store_kv(
        self,
        key: Tensor,
        value: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
    ) -> None:
        if key_cache.dtype not in _FUSED_DTYPES:
            return super().store_kv(key, value, key_cache, value_cache, meta)
        slots = self._cached(meta, ("slots",), lambda: meta.slot_mapping.to(torch.int32))
        _torch_npu()._npu_reshape_and_cache(
            key.contiguous(), value.contiguous(), key_cache, value_cache, slots
        )

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
        if meta.has_prefix or query.dtype not in _FUSED_DTYPES:
            return super().prefill(
                query, key, value, key_cache, value_cache, meta, scale, alibi_slopes
            )
        torch_npu = _torch_npu()
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        heads, kv_heads = query.shape[1], key.shape[1]
        out = torch.empty_like(query)
        if alibi_slopes is None:
            torch_npu._npu_flash_attention(
                query=query,
                key=key,
                value=value,
                mask=self._causal_mask(meta, query.dtype, query.device),
                seq_len=self._host_lens(meta),
                scale_value=scale,
                num_heads=heads,
                num_kv_heads=kv_heads,
                out=out,
            )
        else:
            # kernel_type=0 + mask_type=2: the configuration of op-plugin's own bf16 ALiBi test.
            torch_npu.atb._npu_flash_attention_v2(
                query,
                key,
                value,
                meta.seq_lens_list,
                mask=self._prefill_alibi_mask(meta, alibi_slopes, query.dtype, query.device),
                kernel_type=0,
                mask_type=2,
                scale_value=scale,
                num_heads=heads,
                num_kv_heads=kv_heads,
                out=out,
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
        if query.dtype not in _FUSED_DTYPES:
            return super().decode(query, key_cache, value_cache, meta, scale, alibi_slopes)
        torch_npu = _torch_npu()
        query = query.contiguous()
        heads, kv_heads = query.shape[1], key_cache.shape[2]
        out = torch.empty_like(query)
        if alibi_slopes is None:
            torch_npu._npu_paged_attention(
                query=query,
                key_cache=key_cache,
                value_cache=value_cache,
                num_kv_heads=kv_heads,
                num_heads=heads,
                scale_value=scale,
                block_table=meta.block_tables,
                context_lens=self._host_lens(meta),
                out=out,
            )
        else:
            torch_npu.atb._npu_paged_attention_v2(
                query,
                key_cache,
                meta.block_tables,
                meta.seq_lens_list,
                value_cache=value_cache,
                mask=self._decode_alibi_mask(meta, alibi_slopes, query.dtype, query.device),
                num_kv_heads=kv_heads,
                num_heads=heads,
                scale_value=scale,
                mask_type=2,
                out=out,
            )
        return out

    # --- per-step inputs -------------------------------------------------------------------

    def _cached(self, meta: AttentionMetadata, key: tuple, build: Any) -> Tensor:
        if meta is not self._step_meta:
            self._step_meta, self._step_cache = meta, {}
        if key not in self._step_cache:
            self._step_cache[key] = build()
        return self._step_cache[key]

    def _host_lens(self, meta: AttentionMetadata) -> Tensor:
        # NOTE: the ATB ops read lengths on the host (vllm-ascend passes a CPU int32 tensor).
        return self._cached(
            meta, ("lens",), lambda: torch.tensor(meta.seq_lens_list, dtype=torch.int32)
        )

    def _causal_mask(
        self, meta: AttentionMetadata, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """``[S, S]`` mask for ``_npu_flash_attention``, S = longest sequence of the pass.

        NOTE: value convention from vllm-ascend (v0.7.3 attention_mask.py): fp16 masks hold
        float32-min (-inf once cast) above the diagonal, bf16 masks hold 1 there.
        """

        def build() -> Tensor:
            s = meta.max_seqlen_k
            upper = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
            fill = torch.finfo(torch.float32).min if dtype == torch.float16 else 1.0
            return torch.zeros(s, s, device=device).masked_fill(upper, fill).to(dtype)

        return self._cached(meta, ("causal", dtype), build)

    def _prefill_alibi_mask(
        self, meta: AttentionMetadata, slopes: Tensor, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """``[B, heads, S, S]`` = slope * (j - i), plus a large negative value above the diagonal.

        The kernel reads ``mask[b, :, :len_b, :len_b]`` and adds it to the scaled scores (golden of
        op-plugin's ``test_flash_attention_case_fa_encoder_nocache_bf16_alibi``). Without a prefix
        every sequence starts at position 0, so all B slices are equal; the op documents only the
        4-D ALiBi shape, hence the copy (memory B * heads * S^2 * 2 bytes).
        NOTE: masked value from the same test: -inf for bf16, -10000 for fp16.
        """

        def build() -> Tensor:
            s = meta.max_seqlen_k
            pos = torch.arange(s, device=device, dtype=torch.float32)
            bias = (
                slopes.to(device, torch.float32)[:, None, None]
                * (pos[None, :] - pos[:, None])[None]
            )
            masked = float("-inf") if dtype == torch.bfloat16 else -10000.0
            upper = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
            bias = bias.masked_fill(upper, masked).to(dtype)
            return bias[None].expand(meta.num_seqs, -1, -1, -1).contiguous()

        return self._cached(meta, ("alibi_prefill", dtype, slopes.shape[0]), build)

    def _decode_alibi_mask(
        self, meta: AttentionMetadata, slopes: Tensor, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """``[B, heads, 1, L]`` with row ``slope * (j - (len_b - 1))``, L = longest sequence.

        The true decode bias is ``slope * (j - (len_b - 1))``; MindIE passes one shared row
        ``[heads, 1, L]`` = ``slope * (j - (L - 1))``, equal up to a per-row constant, which softmax
        ignores. We use the also-documented per-sequence form so that the keys that matter (near
        the query) get biases near 0: in bf16 a shared row would store e.g. -500 + small for a
        sequence 1000 tokens shorter, where the bf16 step is 2. Entries ``j >= len_b`` are never
        read (the op stops at ``context_lens``).
        """

        def build() -> Tensor:
            pos = torch.arange(meta.max_seqlen_k, device=device, dtype=torch.float32)
            last = torch.tensor(meta.seq_lens_list, device=device, dtype=torch.float32) - 1
            rel = pos[None, :] - last[:, None]  # [B, L]
            row = slopes.to(device, torch.float32)[None, :, None] * rel[:, None, :]  # [B, heads, L]
            return row[:, :, None, :].to(dtype).contiguous()

        return self._cached(meta, ("alibi_decode", dtype, slopes.shape[0]), build)
