"""Startup: ServerConfig -> device, process group, kernels, model, tokenizer -> Generator."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from loguru import logger

from tgi_npu_backend.kernels import AttentionBackend, check_block_size, get_backend
from tgi_npu_backend.models.config import ModelConfig
from tgi_npu_backend.models.layers.quant import detect as detect_quantization
from tgi_npu_backend.models.layers.quant.methods import weight_bytes
from tgi_npu_backend.models.registry import load_model, read_model_config

from . import device as devices
from .config import ServerConfig
from .distributed import abort_process, init_parallel, shard_size
from .generator import Generator
from .hub import resolve_model_dir
from .kv_cache import KVCacheSpec
from .settings import ShardSettings, TextSettings


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    # NOTE: left truncation, as TGI's server and router tokenize (PROTOCOL.md 0.12)
    return AutoTokenizer.from_pretrained(
        model_dir, padding_side="left", truncation_side="left", trust_remote_code=trust_remote_code
    )


def eos_token_ids(model_dir: Path, config_eos: tuple[int, ...], tokenizer) -> frozenset[int]:
    """generation_config.json's eos_token_id (int or list) wins, then config.json, then the tokenizer."""
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        if eos is not None:
            return frozenset(eos if isinstance(eos, list) else [eos])
    if config_eos:
        return frozenset(config_eos)
    return frozenset([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else frozenset()


def model_max_length(max_position_embeddings: int | None, tokenizer) -> int | None:
    if max_position_embeddings:
        return max_position_embeddings
    n = getattr(tokenizer, "model_max_length", None)
    return n if n and n < 10**7 else None  # HF uses a huge sentinel when unknown


def check_tensor_parallel(cfg: ModelConfig, world_size: int) -> None:
    """Refuse, before joining the process group, a world size that a sharded dimension does not
    divide (every rank holds an equal block of heads, vocabulary rows and MLP columns)."""
    for name, size in (
        ("num_attention_heads", cfg.num_heads),
        ("vocab_size", cfg.vocab_size),
        ("intermediate_size", cfg.intermediate_size),
    ):
        shard_size(size, world_size, f"{cfg.model_type} {name}")
    cfg.kv_heads_per_rank(world_size)  # KV heads: split evenly, or replicated (world % kv == 0)


def backend_for(platform: devices.Platform, cpu_attention: str = "auto") -> AttentionBackend:
    """The attention backend for ``platform``; the emulated NPU reports fallbacks and mask sizes
    to the emulation's counters. ``cpu_attention``: the CPU backend's decode ("auto": the native
    kernel where it builds, "torch": PyTorch ops)."""
    if platform.kind == "npu":
        from tgi_npu_backend.kernels.npu import NpuBackend

        observer = None
        if platform.emulated:
            from tgi_npu_backend.npu_emulation import state

            observer = state()
        return NpuBackend(observer=observer)
    return get_backend(platform.device, native=cpu_attention == "auto")


def build_generator(config: ServerConfig) -> Generator:
    model_dir = resolve_model_dir(config.model_id, config.revision, config.hub_cache)
    model_config = read_model_config(model_dir)  # refuses unsupported architectures early
    check_tensor_parallel(model_config, config.world_size)
    quant = detect_quantization(model_dir, config.quantize)  # refuses what it cannot serve
    platform = devices.select_platform(config.device, config.rank, config.emulation)
    device = platform.device
    weight_only = quant is not None and quant.labels == ["w8a16"]
    dtype = devices.select_dtype(config.dtype, platform, model_config.torch_dtype, weight_only)
    if weight_only and config.dtype is None and platform.kind == "cpu" and dtype == torch.bfloat16:
        logger.info("W8A16 on the CPU: the model runs in bfloat16 (16-bit activations, the int8 "
                    "kernel's input type); --dtype float32 keeps float32 outside the int8 layers")
    # NOTE: bind the NPU before HCCL and before any allocation (vllm-ascend's worker does the
    # same), then fail on an unsupported SoC or a missing NNAL before the socket appears.
    platform.set_device()
    devices.check_npu_startup(platform, dtype)
    parallel = init_parallel(
        config.rank,
        config.world_size,
        config.master_addr,
        config.master_port,
        platform.dist_backend,
        timeout_s=config.dist_timeout_s,
        on_peer_lost=partial(abort_process, remove=[config.socket_path]),
    )
    backend = backend_for(platform, config.cpu_attention)
    block_size = config.block_size
    if block_size is None:
        block_size = backend.block_size_for(model_config.head_dim)
    check_block_size(block_size)
    if config.attention_hint:
        # NOTE: the launcher computes ATTENTION for CUDA; Info tells the router what runs here.
        logger.info(f"ATTENTION={config.attention_hint} from the launcher is a hint; using paged-{backend.name}")
    logger.info(
        f"loading {model_config.model_type} from {model_dir} on {platform.name} ({device}) as {dtype} "
        f"(rank {parallel.rank}/{parallel.world_size}, attention {backend.name}, block size {block_size})"
    )
    if quant is not None:
        quant = replace(quant, ops="npu" if platform.kind == "npu" else "cpu")
        logger.info(f"quantization: {quant.description} (int8 kernels: {quant.ops}); embeddings and "
                    "the LM head stay float")
    model = load_model(
        model_dir, dtype=dtype, device=device, backend=backend, parallel=parallel, quant=quant,
        cpu_gemm=config.cpu_gemm,
    )
    logger.info(f"weights on this rank: {weight_bytes(model) / 2**20:.1f} MiB")
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    kv_spec = KVCacheSpec(
        num_layers=model_config.num_layers,
        num_kv_heads=model_config.kv_heads_per_rank(parallel.world_size),
        head_dim=model_config.head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    text = TextSettings(
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(model_dir, model_config.eos_token_ids, tokenizer),
        special_ids=frozenset(tokenizer.all_special_ids),
        model_max_length=model_max_length(model_config.max_position_embeddings, tokenizer),
    )
    settings = ShardSettings(
        platform=platform,
        dtype=dtype,
        kv_spec=kv_spec,
        kv_cache_fraction=config.kv_cache_fraction,
        kv_cache_tokens=config.kv_cache_tokens,
        max_batch_size=config.max_batch_size,
        max_input_tokens=config.max_input_tokens,
        prefix_caching=config.prefix_caching,
        chunking=config.prefill_chunking,
        watermark_gamma=config.watermark_gamma,
        watermark_delta=config.watermark_delta,
    )
    return Generator(model=model, backend=backend, text=text, settings=settings, parallel=parallel)
