"""The shard's settings, built once at load (``load.py``) and passed whole: what the tokenizer
says about text, and the choices the shard runs with. Nothing downstream copies their fields into
keyword arguments of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .device import Platform
from .kv_cache import KVCacheSpec


@dataclass(frozen=True)
class TextSettings:
    """How request text becomes tokens and back."""

    tokenizer: object  # transformers PreTrainedTokenizerFast (left truncation)
    eos_token_ids: frozenset[int]
    special_ids: frozenset[int]
    model_max_length: int | None  # the model's context length, when known


@dataclass(frozen=True)
class ShardSettings:
    """The shard's fixed choices: device, dtype, KV layout, features and their parameters."""

    platform: Platform
    dtype: torch.dtype
    kv_spec: KVCacheSpec
    kv_cache_fraction: float | None = None  # None: the platform's default share
    kv_cache_tokens: int | None = None  # room for this many tokens (wins over the fraction)
    max_batch_size: int | None = None  # the router's --max-batch-size: sizes the CPU KV pool
    # --max-input-tokens (the shard's own limit until Warmup settles the router's)
    max_input_tokens: int | None = None
    # Info.use_prefix_caching: the router then sends cache_len > 0 for prompts whose
    # block-aligned prefix is still in the KV pool
    prefix_caching: bool = False
    # Info.support_chunking: the router may cut prompts (Request.chunk_len) and send
    # Prefill(batch, cached_batch); the shard cuts the following chunks itself
    chunking: bool = False
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0

    @property
    def device(self) -> torch.device:
        return self.platform.device

    @property
    def block_size(self) -> int:
        return self.kv_spec.block_size
