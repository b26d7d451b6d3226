"""``ModelConfig``: the one reader of Hugging Face ``config.json`` quirks.

Built once from the raw ``config.json`` dict (not ``AutoConfig``: we want to see exactly what the
checkpoint says, and refuse what we do not implement instead of silently running it wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tgi_npu_backend.distributed import shard_size

SUPPORTED_MODEL_TYPES = ("bloom", "gemma")

# Architectures that look like ours but are not: each needs a feature this server lacks.
_REFUSED_MODEL_TYPES = {
    "gemma2": "Gemma 2/3 use logit soft-capping and sliding-window attention, "
    "which this server does not implement",
    "gemma3": "Gemma 2/3 use logit soft-capping and sliding-window attention, "
    "which this server does not implement",
    "gemma3_text": "Gemma 2/3 use logit soft-capping and sliding-window attention, "
    "which this server does not implement",
    "gemma3n": "Gemma 3n uses per-layer embeddings, AltUp and sliding-window attention, "
    "which this server does not implement",
    "gemma3n_text": "Gemma 3n uses per-layer embeddings, AltUp and sliding-window attention, "
    "which this server does not implement",
    "recurrent_gemma": "RecurrentGemma (Griffin) is a recurrent architecture, "
    "which this server does not implement",
    "paligemma": "PaliGemma is a vision-language model, which this server does not implement",
}

# Gemma-1 config keys that, when set, mean a later Gemma generation's attention.
_GEMMA_REFUSED_KEYS = ("final_logit_softcapping", "attn_logit_softcapping", "sliding_window")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "bloom" | "gemma"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int | None  # None for BLOOM (ALiBi has no trained maximum)
    rope_theta: float | None  # None for BLOOM (no rotary embeddings)
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    torch_dtype: str | None  # the checkpoint's dtype as written in config.json
    apply_residual_connection_post_layernorm: bool = False  # BLOOM only
    attention_bias: bool = False  # Gemma q/k/v/o biases (False in every released Gemma)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from the raw ``config.json`` dict; raise ``ValueError`` for what we don't serve."""
        model_type = cfg.get("model_type")
        if model_type in _REFUSED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported: {_REFUSED_MODEL_TYPES[model_type]}. "
                f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "bloom":
            return _bloom(cfg)
        if model_type == "gemma":
            return _gemma(cfg)
        raise ValueError(
            f"model_type {model_type!r} is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def heads_per_rank(self, world_size: int) -> int:
        return shard_size(self.num_heads, world_size, "num_attention_heads")

    def kv_heads_per_rank(self, world_size: int) -> int:
        """KV heads held by each rank.

        With at least as many KV heads as ranks, they are split evenly (``kv % world == 0``).
        With fewer (Gemma-2B: one KV head), each KV head is *replicated* on
        ``world / kv`` consecutive ranks, which then need ``world % kv == 0``; every rank holds
        one KV head, the one its query heads attend to.
        """
        self.heads_per_rank(world_size)
        kv = self.num_kv_heads
        if kv >= world_size:
            return shard_size(kv, world_size, "num_key_value_heads")
        if world_size % kv != 0:
            raise ValueError(
                f"num_key_value_heads = {kv} cannot be replicated over {world_size} ranks: the "
                f"world size must be a multiple of it; choose a --num-shard that is"
            )
        return 1

    def kv_shard(self, rank: int, world_size: int) -> tuple[int, int]:
        """``(index, count)``: which of ``count`` equal row blocks of k/v_proj this rank reads."""
        self.kv_heads_per_rank(world_size)  # validates
        if self.num_kv_heads < world_size:
            # Replicated: rank r serves query heads that all attend to KV head r * kv // world.
            return rank * self.num_kv_heads // world_size, self.num_kv_heads
        return rank, world_size


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _require(cfg: dict[str, Any], *keys: str) -> Any:
    value = _first(cfg, *keys)
    if value is None:
        raise ValueError(f"config.json has none of {', '.join(keys)}")
    return value


def _eos(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def _dtype(cfg: dict[str, Any]) -> str | None:
    # transformers 5 writes "dtype", earlier versions "torch_dtype".
    return _first(cfg, "torch_dtype", "dtype")


def _bloom(cfg: dict[str, Any]) -> ModelConfig:
    hidden = int(_require(cfg, "hidden_size", "n_embed"))
    heads = int(_require(cfg, "n_head", "num_attention_heads"))
    if hidden % heads != 0:
        raise ValueError(f"BLOOM hidden_size {hidden} is not divisible by n_head {heads}")
    return ModelConfig(
        model_type="bloom",
        vocab_size=int(_require(cfg, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_require(cfg, "n_layer", "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,  # NOTE: BLOOM's MLP is fixed at 4x, not configurable
        norm_eps=float(_first(cfg, "layer_norm_epsilon", default=1e-5)),
        max_position_embeddings=None,
        rope_theta=None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        eos_token_ids=_eos(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        torch_dtype=_dtype(cfg),
        apply_residual_connection_post_layernorm=bool(
            cfg.get("apply_residual_connection_post_layernorm", False)
        ),
    )


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moves rope settings into "rope_parameters"; older configs keep them top-level.
    params = cfg.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = cfg.get("rope_scaling")
    if rope_type != "default" or (
        scaling and scaling.get("rope_type", scaling.get("type")) != "default"
    ):
        raise ValueError(
            f"rope scaling {scaling or params!r} is not supported; "
            "only default rotary embeddings are"
        )
    return float(_first(params, "rope_theta", default=_first(cfg, "rope_theta", default=10000.0)))


def _gemma(cfg: dict[str, Any]) -> ModelConfig:
    set_keys = [k for k in _GEMMA_REFUSED_KEYS if cfg.get(k) is not None]
    if set_keys:
        raise ValueError(
            f"this Gemma config sets {', '.join(set_keys)}: that is Gemma 2/3 attention (logit "
            "soft-capping, sliding window), which this server does not implement"
        )
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    kv_heads = int(_first(cfg, "num_key_value_heads", default=heads))
    if heads % kv_heads != 0:
        raise ValueError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    # NOTE: Gemma-7B has head_dim 256 with hidden 3072 / 16 heads = 192: never derive it when given.
    head_dim = int(_first(cfg, "head_dim", default=hidden // heads))
    return ModelConfig(
        model_type="gemma",
        vocab_size=int(_require(cfg, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_require(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_require(cfg, "intermediate_size")),
        norm_eps=float(_first(cfg, "rms_norm_eps", default=1e-6)),
        max_position_embeddings=int(_first(cfg, "max_position_embeddings", default=8192)),
        rope_theta=_rope_theta(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        eos_token_ids=_eos(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        torch_dtype=_dtype(cfg),
        attention_bias=bool(cfg.get("attention_bias", False)),
    )
