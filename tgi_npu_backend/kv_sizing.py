"""How many KV blocks the pool gets at the first Warmup, and why (the log line says both).

* ``--kv-cache-tokens N``: room for N tokens (refused if memory cannot hold them).
* ``--kv-cache-fraction F`` (or ``CUDA_MEMORY_FRACTION`` from TGI's launcher): F of the memory
  still available after the model is loaded and the warmup batch has run.
* Otherwise, on an NPU: 0.9 of free device memory (TGI's wiggle room); on CPU, what the limits
  need: ``max_batch_size`` (MAX_BATCH_SIZE, default 8) requests of ``max_total_tokens`` (else the
  model's context length, else the prefill budget), at least one full prefill batch, capped at
  0.2 of MemAvailable. A CPU has no memory to itself, so taking a fixed share of the machine
  (5 GB for a 572 KB model) was the wrong default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import DEFAULT_CPU_KV_FRACTION, DEFAULT_NPU_KV_FRACTION
from .errors import InvalidRequestError
from .settings import ShardSettings

DEFAULT_CPU_CONCURRENCY = 8
HOW_TO_CHANGE = "change with --kv-cache-tokens or --kv-cache-fraction (TGI_NPU_KV_CACHE_TOKENS/_FRACTION)"


@dataclass(frozen=True)
class PoolSize:
    num_blocks: int
    reason: str  # why this size, and how to change it


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def size_kv_pool(
    settings: ShardSettings,
    *,
    max_prefill: int,
    max_total: int | None,
    model_max_length: int | None,
) -> PoolSize:
    """Blocks for the persistent pool; ``max_total`` is the router's --max-total-tokens (None
    when the shard chooses it), ``max_prefill`` its --max-batch-prefill-tokens."""
    spec, platform = settings.kv_spec, settings.platform
    available = platform.available_memory()
    if settings.kv_cache_tokens is not None:
        blocks = _blocks_for_tokens(settings.kv_cache_tokens, spec.block_size)
        need = blocks * spec.bytes_per_block
        if need > available:
            raise InvalidRequestError(
                f"--kv-cache-tokens={settings.kv_cache_tokens} needs {_gib(need)} of KV cache but "
                f"only {_gib(available)} is available; lower it"
            )
        return PoolSize(blocks, f"sized by --kv-cache-tokens={settings.kv_cache_tokens}")
    if settings.kv_cache_fraction is not None:
        budget = int(available * settings.kv_cache_fraction)
        return PoolSize(
            spec.blocks_for(budget),
            f"{settings.kv_cache_fraction:g} of the {_gib(available)} available, set by "
            "--kv-cache-fraction (TGI_NPU_KV_CACHE_FRACTION, or CUDA_MEMORY_FRACTION)",
        )
    if platform.kind != "cpu":
        budget = int(available * DEFAULT_NPU_KV_FRACTION)
        return PoolSize(
            spec.blocks_for(budget),
            f"the default {DEFAULT_NPU_KV_FRACTION:g} of the {_gib(available)} free device memory; "
            + HOW_TO_CHANGE,
        )
    concurrency = settings.max_batch_size or DEFAULT_CPU_CONCURRENCY
    if max_total is not None:
        per_request, what = max_total, "max_total_tokens"
    elif model_max_length:
        per_request, what = model_max_length, "the model's context length"
    else:
        per_request, what = max_prefill, "max_batch_prefill_tokens"
    tokens = max(concurrency * per_request, max_prefill)
    blocks = _blocks_for_tokens(tokens, spec.block_size)
    cap = spec.blocks_for(int(available * DEFAULT_CPU_KV_FRACTION))
    source = "MAX_BATCH_SIZE" if settings.max_batch_size else "the CPU default"
    reason = (
        f"sized for {concurrency} requests ({source}) of {per_request} tokens ({what}) on CPU"
    )
    if blocks > cap:
        blocks = cap
        reason += f", capped at {DEFAULT_CPU_KV_FRACTION:g} of the {_gib(available)} MemAvailable"
    return PoolSize(blocks, f"{reason}; {HOW_TO_CHANGE}")


def _blocks_for_tokens(tokens: int, block_size: int) -> int:
    # NOTE: +1: block 0 is the router's health probe's, never handed to a request.
    return math.ceil(tokens / block_size) + 1
