"""Finding and fetching model files: local directories and Hugging Face Hub ids.

``download_weights`` is what ``text-generation-server download-weights`` runs (the launcher always
runs it first, also for local directories); ``resolve_model_dir`` is what ``serve`` uses to find
the files afterwards, without touching the network.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from loguru import logger

# Files a shard needs besides the weights.
AUX_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "*.safetensors.index.json",
]


class ModelNotFoundError(ValueError):
    pass


class HubUnreachableError(ModelNotFoundError):
    """The hub cannot be asked (offline mode, or its host name does not resolve)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # short: "HF_HUB_OFFLINE is set", "huggingface.co does not resolve"


ENV_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of boolean variables
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
DEFAULT_ENDPOINT = "https://huggingface.co"
RESOLVE_TIMEOUT_S = 4.0


def hub_offline(env: Mapping[str, str]) -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
    raw = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return raw.upper() in ENV_TRUE


def looks_like_path(model_id: str) -> bool:
    """A model id meant as a directory (hub ids are ``name`` or ``owner/name``)."""
    return model_id.startswith(("/", "./", "../", "~")) or model_id in (".", "..")


def _resolves(host: str, port: int, timeout: float) -> str | None:
    """None if ``host`` resolves within ``timeout`` seconds, else why not."""
    outcome: list[str | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome.append(None)
        except OSError as err:
            outcome.append(getattr(err, "strerror", None) or str(err))

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"


def check_hub_reachable(model_id: str, env: Mapping[str, str]) -> None:
    """Fail at once, saying what to do, where huggingface_hub would retry for most of a minute:
    in offline mode (HF_HUB_OFFLINE), or when the hub's host name does not resolve (no network).
    With a proxy configured the proxy resolves names, so nothing is checked here."""
    if looks_like_path(model_id):
        raise ModelNotFoundError(f"model {model_id!r}: no such directory")
    if hub_offline(env):
        raise HubUnreachableError(
            f"model {model_id!r} is not a local directory and not in the hub cache, and "
            "HF_HUB_OFFLINE is set: pass a local directory as the model id, fill the cache "
            f"where there is network (`text-generation-server download-weights {model_id}`, "
            "HF_HUB_CACHE chooses where), or unset HF_HUB_OFFLINE",
            "HF_HUB_OFFLINE is set",
        )
    if any(env.get(name) for name in PROXY_VARS):
        return
    url = urlsplit(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    host = url.hostname or ""
    why = _resolves(host, url.port or (443 if url.scheme == "https" else 80), RESOLVE_TIMEOUT_S)
    if why is not None:
        raise HubUnreachableError(
            f"cannot fetch {model_id!r}: the Hugging Face Hub's host {host} does not resolve "
            f"({why}). Without network, pass a local directory as the model id, or fill the "
            "hub cache where there is network and set HF_HUB_OFFLINE=1",
            f"{host} does not resolve",
        )


def _hub_error(model_id: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not fetch {model_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
        "Check the model id and revision, HF_TOKEN for gated models, and network access; "
        "offline, pass a local directory or pre-fill the cache (HF_HUB_CACHE)."
    )


def resolve_model_dir(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The local directory holding ``model_id``'s files (a path, or a cached hub snapshot)."""
    path = Path(model_id)
    if path.is_dir():
        return path
    if looks_like_path(model_id):
        raise ModelNotFoundError(f"model {model_id!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        )
    except Exception as err:  # LocalEntryNotFoundError, RepositoryNotFoundError, ...
        raise ModelNotFoundError(
            f"model {model_id!r} is neither a local directory nor in the hub cache "
            f"({type(err).__name__}); run `text-generation-server download-weights {model_id}` first"
        ) from err


def _refuse_adapter(model_id: str, files: list[str]) -> None:
    """The launcher passes --merge-lora for every model; TGI merges PEFT adapters into their base
    model there. LoRA is not supported here, so an adapter repository is refused by name."""
    if "adapter_config.json" in files and "config.json" not in files:
        raise ModelNotFoundError(
            f"{model_id} is a PEFT/LoRA adapter, which this server cannot merge or serve; "
            "serve its base model instead"
        )


def _safetensors_in(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _pickled_weights_in(path: Path) -> list[Path]:
    return sorted([*path.glob("*.bin"), *path.glob("*.pt")])


def convert_to_safetensors(pt_files: list[Path]) -> list[Path]:
    """Convert PyTorch pickles to ``.safetensors`` next to them, without executing pickled code.

    ``torch.load(weights_only=True)`` refuses arbitrary objects; tensors that share storage
    (tied weights) are written once; the result is re-read and compared.
    """
    import torch
    from safetensors.torch import load_file, save_file

    out = []
    for pt in pt_files:
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle.UnpicklingError for anything but plain tensors
            raise ValueError(
                f"{pt} holds more than plain tensors and was not loaded ({type(err).__name__}); "
                "convert it to safetensors in a trusted environment"
            ) from err
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        seen: dict[tuple[int, int], str] = {}
        tensors = {}
        for name, tensor in state.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in seen and state[seen[key]].shape == tensor.shape:
                logger.info(f"{pt.name}: {name} shares storage with {seen[key]}; stored once")
                continue
            seen[key] = name
            tensors[name] = tensor.contiguous()
        target = pt.with_suffix(".safetensors")
        save_file(tensors, str(target), metadata={"format": "pt"})
        reloaded = load_file(str(target))
        for name, tensor in tensors.items():
            if not torch.equal(reloaded[name], tensor):
                raise ValueError(f"conversion of {pt} changed tensor {name}")
        logger.info(f"converted {pt} -> {target}")
        out.append(target)
    return out


def download_weights(
    model_id: str,
    revision: str | None = None,
    extension: str = ".safetensors",
    auto_convert: bool = True,
    cache_dir: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Make ``model_id``'s weights available locally as safetensors; returns the directory.
    ``env`` is the process environment (HF_HUB_OFFLINE, HF_ENDPOINT, proxies)."""
    if extension != ".safetensors":
        raise ValueError(f"--extension {extension}: only .safetensors weights are served")
    path = Path(model_id)
    if path.is_dir():
        _refuse_adapter(model_id, [p.name for p in path.iterdir()])
        if _safetensors_in(path):
            logger.info(f"found safetensors weights in {path}")
            return path
        pickled = _pickled_weights_in(path)
        if pickled and auto_convert:
            convert_to_safetensors(pickled)
            return path
        raise ModelNotFoundError(
            f"no *.safetensors weights in {path}"
            + (" (pass --auto-convert to convert the .bin files)" if pickled else "")
        )

    from huggingface_hub import HfApi, snapshot_download

    try:  # already cached: no network
        cached = resolve_model_dir(model_id, revision, cache_dir)
        if _safetensors_in(cached):
            logger.info(f"found cached safetensors weights for {model_id} in {cached}")
            return cached
    except ModelNotFoundError:
        pass
    check_hub_reachable(model_id, env or {})
    try:
        files = HfApi().list_repo_files(model_id, revision=revision)
        _refuse_adapter(model_id, files)
        has_safetensors = any(f.endswith(".safetensors") for f in files)
        patterns = AUX_PATTERNS + (["*.safetensors"] if has_safetensors else ["*.bin"])
        local = Path(
            snapshot_download(model_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
        )
    except ModelNotFoundError:
        raise
    except Exception as err:
        raise _hub_error(model_id, err) from err
    if not has_safetensors:
        if not auto_convert:
            raise ModelNotFoundError(f"{model_id} has no safetensors weights; pass --auto-convert")
        convert_to_safetensors(_pickled_weights_in(local))
    return local
