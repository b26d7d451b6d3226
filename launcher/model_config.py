"""What the launcher reads from the model's ``config.json``: the ATTENTION / PREFIX_CACHING
hints for the shards (TGI ``resolve_attention``), the quantization method and the default
prefill budget."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from .errors import LauncherError

log = logging.getLogger(__name__)


def load_config(model_id: str, revision: str | None, env: Mapping[str, str]) -> dict:
    """``<dir>/config.json`` for a local path, else the hub's (the cached copy offline).

    Raises LauncherError, saying what to change, when there is none to read: then nothing
    derived from it (attention, prefix caching, the prefill budget) would be right."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, "config.json")
        if not os.path.isfile(path):
            raise LauncherError(f"--model-id {model_id}: the directory has no config.json")
    else:
        path = _hub_config(model_id, revision, env)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise LauncherError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise LauncherError(f"{path} is not a JSON object")
    return config


def _hub_config(model_id: str, revision: str | None, env: Mapping[str, str]) -> str:
    from huggingface_hub import hf_hub_download

    from tgi_npu_backend.hub import HubUnreachableError, ModelNotFoundError, check_hub_reachable

    unreachable: HubUnreachableError | None = None
    try:
        check_hub_reachable(model_id, env)
    except HubUnreachableError as err:
        unreachable = err  # the cached copy may still do
    except ModelNotFoundError as err:
        raise LauncherError(str(err)) from None
    local_only = unreachable is not None
    try:
        path = hf_hub_download(model_id, "config.json", revision=revision, local_files_only=local_only)
    except Exception as err:  # noqa: BLE001 - not cached, gated, not a model repository, ...
        if unreachable is not None:
            raise LauncherError(str(unreachable)) from None
        raise LauncherError(
            f"cannot read config.json of {model_id!r} from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). Check the model id and revision, and HF_TOKEN for "
            "gated models"
        ) from None
    if unreachable is not None:
        log.info(f"The hub is not asked ({unreachable.reason}): using the cached config.json of {model_id}")
    return path


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


def resolve_attention(config: dict | None, env: Mapping[str, str]) -> tuple[str, str]:
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


def resolve_quantize(config: dict | None, given: str | None) -> str | None:
    """``--quantize`` as TGI's launcher picks it: the user's value, else config.json's
    ``quantization_config.quant_method`` (the shard refuses a method it cannot serve, naming it).
    msModelSlim checkpoints carry none: the shard finds their description file itself."""
    if given:
        return given
    qcfg = (config or {}).get("quantization_config")
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if method:
        log.info(f"Auto selecting quantization method {method}")
    return method or None
