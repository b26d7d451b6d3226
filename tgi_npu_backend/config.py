"""The shard's configuration: flags and environment, read once at the edge into a frozen dataclass.

``cli.py`` is the only module that reads the shard's settings from ``os.environ``; it hands the
mapping to ``ServerConfig.from_cli``. Everything downstream receives this object. Three variables
that say where files are built and kept, not how the shard serves, are read where they are used,
as build tools read them: ``CC`` (the C compiler for the CPU path's native kernels,
``device_kernels/cpu_native.py``), ``XDG_CACHE_HOME`` (``user_cache.py``) and
``TGI_NPU_DEMO_CACHE`` (the demo's checkpoints, ``demo_training.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tgi_npu_backend.models.layers.cpu_gemm import MODES as CPU_GEMM_MODES
from tgi_npu_backend.models.layers.quant.detect import check_flag as check_quantize

from . import launcher_env

CPU_ATTENTION_MODES = ("auto", "torch")

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "npu", "npu-emulated")

# tracing level names the TGI launcher may pass -> loguru level names (None = logging off)
LOG_LEVELS: dict[str, str | None] = {
    "TRACE": "TRACE",
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARN": "WARNING",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "CRITICAL",
    "OFF": None,
}

DEFAULT_CPU_KV_FRACTION = 0.2  # share of MemAvailable given to the KV pool on CPU
DEFAULT_NPU_KV_FRACTION = 0.9  # share of free device memory after warmup (TGI_WIGGLE_ROOM-like)
DEFAULT_DIST_TIMEOUT_S = 120.0  # rendezvous, each collective, and a silent peer (tensor parallel)


def _flag_error(flag: str, value: object, why: str) -> ValueError:
    return ValueError(f"{flag} {value}: {why}")


def normalize_log_level(level: str) -> str | None:
    key = level.strip().upper()
    if key not in LOG_LEVELS:
        raise _flag_error("--logger-level", level, f"unknown level; use one of {', '.join(LOG_LEVELS)}")
    return LOG_LEVELS[key]


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


def _env_flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    # NOTE: TGI's launcher writes "true"/"1" (on) or "0"/"false" (off); anything else is off.
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in ("1", "true")


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    revision: str | None = None
    sharded: bool = False
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's half type on NPU
    # --quantize (eetq | compressed-tensors | msmodelslim); None: as the checkpoint is
    quantize: str | None = None
    trust_remote_code: bool = False
    uds_path: str = "/tmp/text-generation-server"
    log_level: str | None = "INFO"
    json_output: bool = False
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.server"
    max_input_tokens: int | None = None
    # distributed (launcher environment)
    rank: int = 0
    world_size: int = 1
    master_addr: str = "localhost"
    master_port: int = 29500
    dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    # hints from the launcher: the router only uses what Info returns
    attention_hint: str | None = None
    # PREFIX_CACHING from the launcher ("1"/"true" => on): Info.use_prefix_caching, which makes
    # the router reuse KV blocks of shared prompt prefixes (Request.cache_len > 0)
    prefix_caching: bool = False
    # PREFILL_CHUNKING (TGI's server reads it, default on; "0"/"false" => off): Info.support_chunking
    prefill_chunking: bool = True
    # model files
    hub_cache: str | None = None
    # generation
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    # backend tuning (ours; the stock launcher passes none of these)
    device: str = "auto"
    # npu-emulated only: the emulation's knobs (TGI_NPU_EMULATION, e.g. "soc=910B,mem_free=4GiB")
    emulation: str | None = None
    block_size: int | None = None  # None: the attention backend's recommendation
    kv_cache_fraction: float | None = None  # None: per-device default (see --help)
    kv_cache_tokens: int | None = None  # room for this many tokens (wins over the fraction)
    max_batch_size: int | None = None  # MAX_BATCH_SIZE from the launcher: sizes the CPU KV pool
    # float32 CPU linears (TGI_NPU_CPU_GEMM): "auto" measures at load, "packed" / "plain" pin it
    cpu_gemm: str = "auto"
    # CPU decode attention (TGI_NPU_CPU_ATTENTION): "auto" runs the native kernel where it
    # builds (device_kernels/cpu_native.py), "torch" the PyTorch ops
    cpu_attention: str = "auto"

    @property
    def socket_path(self) -> str:
        return f"{self.uds_path}-{self.rank}"

    @property
    def server_urls(self) -> list[str]:
        return [f"unix://{self.uds_path}-{r}" for r in range(self.world_size)]

    @classmethod
    def from_cli(
        cls,
        *,
        model_id: str,
        env: Mapping[str, str],
        revision: str | None = None,
        sharded: bool = False,
        quantize: str | None = None,
        speculate: int | None = None,
        dtype: str | None = None,
        kv_cache_dtype: str | None = None,
        trust_remote_code: bool = False,
        uds_path: str = "/tmp/text-generation-server",
        logger_level: str = "INFO",
        json_output: bool = False,
        otlp_endpoint: str | None = None,
        otlp_service_name: str = "text-generation-inference.server",
        max_input_tokens: int | None = None,
        device: str = "auto",
        block_size: int | None = None,
        kv_cache_fraction: float | None = None,
        kv_cache_tokens: int | None = None,
        dist_timeout: float | None = None,
    ) -> ServerConfig:
        """Validate flags + environment; refuse what this shard cannot honour, naming the flag."""
        check_quantize(quantize)
        if speculate:
            raise _flag_error("--speculate", speculate, "speculative decoding is not supported; drop the flag")
        if kv_cache_dtype:
            raise _flag_error(
                "--kv-cache-dtype", kv_cache_dtype, "fp8 KV caches are not supported; drop the flag"
            )
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise _flag_error("--dtype", dtype, f"use one of {', '.join(SUPPORTED_DTYPES)}")
        if device == "auto":
            device = env.get("TGI_NPU_DEVICE") or device
        if device not in DEVICES:
            raise _flag_error("--device", device, f"use one of {', '.join(DEVICES)}")
        if max_input_tokens is not None and max_input_tokens < 1:
            raise _flag_error("--max-input-tokens", max_input_tokens, "must be at least 1")
        if env.get("LORA_ADAPTERS"):
            raise ValueError(
                f"LORA_ADAPTERS={env['LORA_ADAPTERS']!r}: LoRA adapters are not supported by this "
                "shard; start the launcher without --lora-adapters"
            )
        log_level = normalize_log_level(logger_level)

        rank = _env_int(env, "RANK") or 0
        world_size = _env_int(env, "WORLD_SIZE") or 1
        if sharded and ("RANK" not in env or "WORLD_SIZE" not in env):
            raise ValueError("--sharded needs RANK and WORLD_SIZE in the environment (the launcher sets them)")
        if not sharded and world_size > 1:
            raise ValueError(f"WORLD_SIZE={world_size} but --sharded was not passed")
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")

        if block_size is None:
            block_size = _env_int(env, "TGI_NPU_BLOCK_SIZE")
        if kv_cache_fraction is None and env.get("TGI_NPU_KV_CACHE_FRACTION"):
            kv_cache_fraction = _env_float(env, "TGI_NPU_KV_CACHE_FRACTION", 0.0)
        if kv_cache_fraction is not None and not 0.0 < kv_cache_fraction <= 1.0:
            raise _flag_error("--kv-cache-fraction", kv_cache_fraction, "must be in (0, 1]")
        launcher_env.check_unsupported(env)
        memory_fraction = launcher_env.memory_fraction(env)
        if memory_fraction is not None:
            if kv_cache_fraction is not None and kv_cache_fraction != memory_fraction:
                raise ValueError(
                    f"CUDA_MEMORY_FRACTION={memory_fraction} (--cuda-memory-fraction) and "
                    f"--kv-cache-fraction={kv_cache_fraction} disagree; set only one"
                )
            kv_cache_fraction = memory_fraction
        if kv_cache_tokens is None:
            kv_cache_tokens = _env_int(env, "TGI_NPU_KV_CACHE_TOKENS")
        if kv_cache_tokens is not None and kv_cache_tokens < 1:
            raise _flag_error("--kv-cache-tokens", kv_cache_tokens, "must be at least 1")
        max_batch_size = _env_int(env, "MAX_BATCH_SIZE")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"MAX_BATCH_SIZE={max_batch_size} (--max-batch-size): must be at least 1")

        cpu_gemm = env.get("TGI_NPU_CPU_GEMM") or "auto"
        if cpu_gemm not in CPU_GEMM_MODES:
            raise ValueError(
                f"TGI_NPU_CPU_GEMM={cpu_gemm!r}: use one of {', '.join(CPU_GEMM_MODES)}"
            )

        cpu_attention = env.get("TGI_NPU_CPU_ATTENTION") or "auto"
        if cpu_attention not in CPU_ATTENTION_MODES:
            raise ValueError(
                f"TGI_NPU_CPU_ATTENTION={cpu_attention!r}: use one of {', '.join(CPU_ATTENTION_MODES)}"
            )

        if dist_timeout is None:
            dist_timeout = _env_float(env, "TGI_NPU_DIST_TIMEOUT", DEFAULT_DIST_TIMEOUT_S)
        if not dist_timeout > 0:
            raise _flag_error("--dist-timeout", dist_timeout, "must be a positive number of seconds")

        return cls(
            model_id=model_id,
            revision=revision,
            sharded=sharded,
            dtype=dtype,
            quantize=quantize or None,
            trust_remote_code=trust_remote_code,
            uds_path=uds_path,
            log_level=log_level,
            json_output=json_output,
            otlp_endpoint=otlp_endpoint,
            otlp_service_name=otlp_service_name,
            max_input_tokens=max_input_tokens,
            rank=rank,
            world_size=world_size,
            master_addr=env.get("MASTER_ADDR", "localhost"),
            master_port=_env_int(env, "MASTER_PORT") or 29500,
            dist_timeout_s=dist_timeout,
            attention_hint=env.get("ATTENTION"),
            prefix_caching=_env_flag(env, "PREFIX_CACHING"),
            prefill_chunking=_env_flag(env, "PREFILL_CHUNKING", default=True),
            hub_cache=env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"),
            watermark_gamma=_env_float(env, "WATERMARK_GAMMA", 0.5),
            watermark_delta=_env_float(env, "WATERMARK_DELTA", 2.0),
            device=device,
            emulation=env.get("TGI_NPU_EMULATION"),
            block_size=block_size,
            kv_cache_fraction=kv_cache_fraction,
            kv_cache_tokens=kv_cache_tokens,
            max_batch_size=max_batch_size,
            cpu_gemm=cpu_gemm,
            cpu_attention=cpu_attention,
        )
