"""The KV pool's size at the first Warmup: from what the limits need on CPU (capped), from free
memory on an NPU, or as set; the log line says how big, why, and how to change it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from loguru import logger

from tgi_npu_backend.device import Platform
from tgi_npu_backend.errors import InvalidRequestError
from tgi_npu_backend.kv_cache import KVCacheSpec
from tgi_npu_backend.kv_sizing import size_kv_pool
from tgi_npu_backend.settings import ShardSettings

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=4, head_dim=16, block_size=16, dtype=torch.float32)
PER_BLOCK = SPEC.bytes_per_block  # 16 KiB: 1 KiB per token
GiB = 2**30


@dataclass(frozen=True)
class FixedMemory(Platform):
    free: int = 100 * GiB

    def available_memory(self) -> int:
        return self.free


def settings(kind: str = "cpu", free: int = 100 * GiB, **kw) -> ShardSettings:
    platform = FixedMemory(kind, torch.device("cpu"), free=free)
    return ShardSettings(platform=platform, dtype=torch.float32, kv_spec=SPEC, **kw)


def test_cpu_default_is_what_the_limits_need():
    pool = size_kv_pool(settings(), max_prefill=4096, max_total=None, model_max_length=2048)
    assert pool.num_blocks == 8 * 2048 // 16 + 1  # + block 0, the router's health probe's
    assert "8 requests (the CPU default) of 2048 tokens (the model's context length)" in pool.reason
    assert "--kv-cache-tokens or --kv-cache-fraction" in pool.reason

    pool = size_kv_pool(settings(max_batch_size=2), max_prefill=256, max_total=300, model_max_length=2048)
    assert pool.num_blocks == -(-600 // 16) + 1
    assert "2 requests (MAX_BATCH_SIZE) of 300 tokens (max_total_tokens)" in pool.reason
    # a whole prefill batch always fits
    pool = size_kv_pool(settings(max_batch_size=1), max_prefill=4096, max_total=100, model_max_length=None)
    assert pool.num_blocks == 4096 // 16 + 1
    pool = size_kv_pool(settings(), max_prefill=512, max_total=None, model_max_length=None)
    assert "of 512 tokens (max_batch_prefill_tokens)" in pool.reason


def test_cpu_default_is_capped_at_a_fifth_of_available_memory():
    pool = size_kv_pool(settings(free=GiB // 64), max_prefill=4096, max_total=None, model_max_length=2048)
    assert pool.num_blocks == int(GiB // 64 * 0.2) // PER_BLOCK
    assert "capped at 0.2 of the" in pool.reason


def test_tokens_and_fraction_when_set_and_the_npu_default():
    pool = size_kv_pool(settings(kv_cache_tokens=1000), max_prefill=64, max_total=None, model_max_length=None)
    assert pool.num_blocks == -(-1000 // 16) + 1 and "--kv-cache-tokens=1000" in pool.reason
    with pytest.raises(InvalidRequestError, match="--kv-cache-tokens=1000000 needs"):
        size_kv_pool(settings(free=GiB // 8, kv_cache_tokens=10**6), max_prefill=64, max_total=None,
                     model_max_length=None)
    pool = size_kv_pool(settings(free=GiB // 64, kv_cache_fraction=0.5), max_prefill=64, max_total=None,
                        model_max_length=None)
    assert pool.num_blocks == (GiB // 128) // PER_BLOCK and "set by --kv-cache-fraction" in pool.reason
    pool = size_kv_pool(settings("npu", free=GiB // 64), max_prefill=64, max_total=None, model_max_length=None)
    assert pool.num_blocks == int(GiB // 64 * 0.9) // PER_BLOCK
    assert "the default 0.9 of the" in pool.reason


def test_a_tiny_model_gets_a_tiny_pool_and_the_log_says_why(bloom_dir):
    from router_sim import RouterSim, batch_requests

    from tgi_npu_backend.config import ServerConfig
    from tgi_npu_backend.load import build_generator

    gen = build_generator(ServerConfig.from_cli(model_id=str(bloom_dir), env={}, device="cpu"))
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    try:
        warm = RouterSim("unused", None).warmup_request(None, None, 128, None)
        capacity, max_input, max_total = gen.warmup(batch_requests(warm.batch), None, 128, None)
    finally:
        logger.remove(sink)
    spec = gen.settings.kv_spec
    # bloom_dir: no max_position_embeddings; its tokenizer's model_max_length is 2048
    assert gen.kv_cache.num_blocks == 8 * 2048 // spec.block_size + 1
    assert gen.kv_cache.num_blocks * spec.bytes_per_block < 64 * 2**20  # was 0.2 of MemAvailable
    assert max_total == 2048 and max_input < max_total and capacity >= 8 * 2048
    (line,) = [m for m in lines if m.startswith("KV pool:")]
    assert "sized for 8 requests (the CPU default) of 2048 tokens" in line and "--kv-cache-tokens" in line
