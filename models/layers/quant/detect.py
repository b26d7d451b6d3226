"""Which quantization a model directory and ``--quantize`` ask for, decided once at startup.

As TGI: the stock launcher passes ``--quantize`` from the user or, when none is given, from
``config.json``'s ``quantization_config.quant_method`` (launcher/src/main.rs). msModelSlim
checkpoints carry no ``quantization_config``; they are recognised by their
``quant_model_description*.json`` (vllm-ascend's ``modelslim`` loader does the same).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .scheme import FORMATS, LinearScheme, QuantConfig, SchemeGroup

SUPPORTED = FORMATS  # the --quantize values this shard serves
DESCRIPTION_GLOB = "quant_model_description*.json"
# msModelSlim per-weight types (its weight-format doc) -> our activation modes
MSMODELSLIM_TYPES = {"W8A16": "none", "W8A8": "static", "W8A8_DYNAMIC": "dynamic"}


def unsupported(value: str) -> ValueError:
    return ValueError(
        f"--quantize {value}: this shard does not serve {value!r} checkpoints; supported: "
        f"{', '.join(SUPPORTED)} (eetq = int8 weights quantized at load from a float "
        "checkpoint; compressed-tensors and msmodelslim = int8 W8A8/W8A16 checkpoints)"
    )


def check_flag(quantize: str | None) -> None:
    """Refuse an unsupported ``--quantize`` before anything loads."""
    if quantize and quantize not in SUPPORTED:
        raise unsupported(quantize)


def description_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob(DESCRIPTION_GLOB))


def detect(model_dir: Path, quantize: str | None) -> QuantConfig | None:
    """The QuantConfig for ``model_dir`` served with ``--quantize quantize`` (None: float)."""
    check_flag(quantize)
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    qcfg = config.get("quantization_config")
    method_on_disk = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    descriptions = description_files(model_dir)
    if method_on_disk is not None and method_on_disk != "compressed-tensors":
        raise ValueError(
            f"{model_dir}/config.json: quantization_config.quant_method {method_on_disk!r} is not "
            f"served by this shard; supported: {', '.join(SUPPORTED)}"
        )
    on_disk = "compressed-tensors" if method_on_disk else ("msmodelslim" if descriptions else None)
    if quantize == "eetq":
        if on_disk:
            raise ValueError(
                f"--quantize eetq quantizes a float checkpoint at load, but {model_dir} is already "
                f"quantized ({on_disk}); serve it with --quantize {on_disk} (or without --quantize)"
            )
        return QuantConfig(method="eetq", groups=(SchemeGroup(("Linear",), LinearScheme("eetq")),))
    if quantize and quantize != on_disk:
        found = f"a {on_disk} checkpoint" if on_disk else "a float checkpoint"
        want = (
            "config.json with quantization_config.quant_method 'compressed-tensors'"
            if quantize == "compressed-tensors" else f"a {DESCRIPTION_GLOB} file"
        )
        raise ValueError(
            f"--quantize {quantize} needs {want}, but {model_dir} is {found}; "
            + (f"use --quantize {on_disk}" if on_disk else "drop --quantize or use --quantize eetq")
        )
    if on_disk == "compressed-tensors":
        return compressed_tensors_config(qcfg, model_dir)
    if on_disk == "msmodelslim":
        return msmodelslim_config(descriptions, model_dir)
    return None


# ---- compressed-tensors ---------------------------------------------------------------------
def _ct_error(model_dir: Path, what: str) -> ValueError:
    return ValueError(
        f"{model_dir}/config.json quantization_config: {what}; this shard serves compressed-tensors "
        "int8 W8A16 (per-channel or per-group weights) and W8A8 (per-channel weights with dynamic "
        "per-token or static per-tensor activations)"
    )


def _ct_scheme(group: dict[str, Any], fmt: str, model_dir: Path) -> LinearScheme:
    w = group.get("weights") or {}
    a = group.get("input_activations")
    fmt = group.get("format") or fmt
    if fmt not in ("int-quantized", "pack-quantized", "naive-quantized"):
        raise _ct_error(model_dir, f"format {fmt!r} is not an int8 format")
    if w.get("type") != "int" or w.get("num_bits") != 8:
        raise _ct_error(model_dir, f"weights {w.get('type')}{w.get('num_bits')} are not int8")
    strategy = w.get("strategy")
    if strategy not in ("channel", "group"):
        raise _ct_error(model_dir, f"weight strategy {strategy!r} (not channel or group)")
    if group.get("output_activations"):
        raise _ct_error(model_dir, "output activation quantization is not supported")
    if not w.get("symmetric", True):
        raise _ct_error(model_dir, "asymmetric weights (a weight zero point) are not supported")
    group_size = int(w["group_size"]) if strategy == "group" else None
    activations = "none"
    if a:
        if a.get("type") != "int" or a.get("num_bits") != 8:
            raise _ct_error(model_dir, f"activations {a.get('type')}{a.get('num_bits')} are not int8")
        if a.get("dynamic"):
            if a.get("strategy") != "token" or not a.get("symmetric", True):
                raise _ct_error(model_dir, "dynamic activations must be symmetric per-token")
            activations = "dynamic"
        else:
            if a.get("strategy") != "tensor" or not a.get("symmetric", True):
                raise _ct_error(model_dir, f"static activations must be symmetric per-tensor (found "
                                f"{a.get('strategy')!r}, symmetric={a.get('symmetric', True)})")
            activations = "static"
        if group_size is not None:
            raise _ct_error(model_dir, "W8A8 with per-group weight scales is not supported")
    return LinearScheme(
        "compressed-tensors", activations, group_size=group_size, packed=fmt == "pack-quantized"
    )


def compressed_tensors_config(qcfg: dict[str, Any], model_dir: Path) -> QuantConfig:
    if qcfg.get("quantization_status") not in (None, "compressed", "frozen"):
        raise _ct_error(model_dir, f"quantization_status {qcfg.get('quantization_status')!r}")
    if qcfg.get("kv_cache_scheme"):
        raise _ct_error(model_dir, "kv_cache_scheme (quantized KV caches) is not supported")
    if qcfg.get("sparsity_config"):
        raise _ct_error(model_dir, "sparsity_config (sparse weights) is not supported")
    fmt = qcfg.get("format") or "int-quantized"
    groups = tuple(
        SchemeGroup(tuple(g.get("targets") or ()), _ct_scheme(g, fmt, model_dir))
        for g in (qcfg.get("config_groups") or {}).values()
    )
    if not groups:
        raise _ct_error(model_dir, "no config_groups")
    return QuantConfig("compressed-tensors", groups=groups, ignore=tuple(qcfg.get("ignore") or ()))


# ---- msModelSlim ----------------------------------------------------------------------------
def msmodelslim_config(files: list[Path], model_dir: Path) -> QuantConfig:
    """``quant_model_description*.json``: ``{"model_quant_type": "W8A8", "<name>.weight": "W8A8"
    | "W8A16" | "W8A8_DYNAMIC" | "FLOAT", ...}`` (msModelSlim's weight-format documentation)."""
    if len(files) > 1:
        raise ValueError(
            f"{model_dir} has several msModelSlim descriptions ({', '.join(f.name for f in files)}); "
            "keep the one that belongs to the safetensors files"
        )
    desc: dict[str, str] = json.loads(files[0].read_text())
    per_layer: dict[str, LinearScheme | None] = {}
    for key, kind in desc.items():
        if not key.endswith(".weight"):
            continue
        layer = key.removesuffix(".weight")
        if kind == "FLOAT":
            per_layer[layer] = None
        elif kind in MSMODELSLIM_TYPES:
            per_layer[layer] = LinearScheme("msmodelslim", MSMODELSLIM_TYPES[kind])
        else:
            raise ValueError(
                f"{files[0].name}: {key} is {kind!r}; this shard serves msModelSlim "
                f"{', '.join(MSMODELSLIM_TYPES)} and FLOAT layers"
            )
    if desc.get("kv_cache_type"):
        raise ValueError(f"{files[0].name}: kv_cache_type {desc['kv_cache_type']!r} (quantized KV "
                         "cache) is not supported; quantize without KV-cache quantization")
    return QuantConfig("msmodelslim", per_layer=per_layer)
