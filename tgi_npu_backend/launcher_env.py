"""Variables TGI's launcher turns flags into, which mean something on CUDA: each is honoured here
or refused by name, never silently ignored (``ServerConfig.from_cli`` and ``download-weights``
call these with the process environment)."""

from __future__ import annotations

from collections.abc import Mapping

# What text-generation-launcher sets when --cuda-graphs is not given (launcher/src/main.rs);
# ours sets nothing. Only an explicit choice is refused.
LAUNCHER_DEFAULT_CUDA_GRAPHS = "1,2,4,8,16,32"


def check_unsupported(env: Mapping[str, str]) -> None:
    """Raise ValueError naming the variable and the launcher flag behind it."""
    rope = {k: env[k] for k in ("ROPE_SCALING", "ROPE_FACTOR") if env.get(k, "").strip()}
    if rope:
        given = " ".join(f"{k}={v}" for k, v in rope.items())
        raise ValueError(
            f"{given}: RoPE scaling is not supported by this shard (BLOOM has no rotary "
            "embeddings; Gemma is served at its trained context length); start the launcher "
            "without --rope-scaling/--rope-factor"
        )
    override = env.get("WEIGHTS_CACHE_OVERRIDE", "").strip()
    if override:
        raise ValueError(
            f"WEIGHTS_CACHE_OVERRIDE={override}: not supported by this shard; pass the directory "
            "that holds the model (config.json, tokenizer and *.safetensors) as --model-id, and "
            "start the launcher without --weights-cache-override"
        )
    graphs = env.get("CUDA_GRAPHS", "").replace(" ", "")
    if graphs not in ("", "0", LAUNCHER_DEFAULT_CUDA_GRAPHS):
        raise ValueError(
            f"CUDA_GRAPHS={graphs}: this shard captures no graphs (CPU and NPU run eagerly); "
            "start the launcher without --cuda-graphs (or with --cuda-graphs 0)"
        )


def notes(env: Mapping[str, str]) -> list[str]:
    """Log lines for accepted variables that change nothing here, so none is silently ignored."""
    graphs = env.get("CUDA_GRAPHS", "").replace(" ", "")
    if graphs == LAUNCHER_DEFAULT_CUDA_GRAPHS:
        return [f"CUDA_GRAPHS={graphs} (the launcher's default) has no effect: no graph capture on CPU/NPU"]
    return []


def memory_fraction(env: Mapping[str, str]) -> float | None:
    """CUDA_MEMORY_FRACTION (TGI's --cuda-memory-fraction, default 1) as the KV pool's share of
    the memory left after the model and warmup; None when it is unset or 1 (the launcher always
    sets it), so the device's own default applies."""
    raw = env.get("CUDA_MEMORY_FRACTION", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"CUDA_MEMORY_FRACTION={raw!r} is not a number (--cuda-memory-fraction)") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"CUDA_MEMORY_FRACTION={raw}: must be in (0, 1] (--cuda-memory-fraction)")
    return None if value == 1.0 else value
