"""What the launcher reads from the model's ``config.json``: the ATTENTION / PREFIX_CACHING
hints for the shards (TGI ``resolve_attention``) and the default prefill budget."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def load_config(model_id: str, revision: str | None) -> dict | None:
    """``<dir>/config.json`` for a local path, else the hub copy; None (with a warning) if absent."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, "config.json")
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model_id, "config.json", revision=revision)
        except Exception as err:  # noqa: BLE001 - offline, gated, or not a model repo
            log.warning(f"Could not read config.json of {model_id}: {err}")
            return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        log.warning(f"Could not read {path}: {err}")
        return None


def head_dim(config: dict) -> int | None:
    if config.get("head_dim"):
        return int(config["head_dim"])
    text = config.get("text_config") or {}
    if text.get("head_dim"):
        return int(text["head_dim"])
    # NOTE: TGI's Config aliases only num_attention_heads; BLOOM's `n_head` gives no head_dim.
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if heads and hidden:
        return int(hidden) // int(heads)
    return None


def resolve_attention(config: dict | None, env: dict[str, str]) -> tuple[str, str]:
    """(ATTENTION, PREFIX_CACHING) as TGI's launcher computes them without a CUDA device: the
    fallback attention is ``paged``. Values already in the environment are kept."""
    prefix = env.get("PREFIX_CACHING")
    attention = env.get("ATTENTION")
    fallback = "paged"  # NOTE: TGI picks flashdecoding only for CUDA compute capability >= 8
    if config is not None:
        if prefix is None and (
            config.get("vision_config") is not None or config.get("is_encoder_decoder")
        ):
            prefix = "0"
        hd = head_dim(config)
        if hd in (64, 128, 256):
            if config.get("model_type") in ("falcon", "deepseek_v2"):
                attention = attention or fallback
                if prefix is None:
                    prefix = "0"
        else:
            attention = attention or fallback
            if prefix is None:
                prefix = "0"
    if attention == "paged" and prefix is None:
        prefix = "0"
    return attention or "flashinfer", prefix or "true"


def default_prefill_tokens(config: dict | None) -> int:
    """4096 (8000 for gemma3), capped by the model's maximum positions."""
    value = 8000 if config and config.get("model_type") == "gemma3" else 4096
    if config:
        for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
            if config.get(key):
                return min(value, int(config[key]))
    return value
