"""Quantized tiny checkpoints made by the real producers' code, or from the format's documentation.

* compressed-tensors: the ``compressed_tensors`` library (what llmcompressor saves with) applies
  the scheme, and the scales come from min-max observations as llmcompressor's default
  ``QuantizationModifier`` observers make them: weights per channel (or group), static input
  scales from calibration prompts run through HF transformers. ``llmcompressor`` itself is not
  used: its 0.14 release pins ``transformers<=5.17.0`` and would replace the transformers this
  project runs on.
* msModelSlim: ``msmodelslim_tool_checkpoint`` runs msModelSlim 26.1.0 itself on the CPU
  (its ``llm_ptq`` Calibrator with ``dev_type="cpu"``: min-max calibration, its own export).
  ``msmodelslim_checkpoint`` also writes the format from msModelSlim's weight-format
  documentation ("msmodelslim量化权重格式", docs of MindStudio-ModelSlim: per-layer ``weight``,
  ``weight_scale``/``weight_offset`` for W8A16, ``input_scale``/``input_offset``/``deq_scale``/
  ``quant_bias`` for W8A8, ``quant_model_description_<type>.json``, its ``deqscale_process`` for
  float16 ``deq_scale``), for the variants the tool does not make from a float32 model here:
  asymmetric W8A16 weights and float16 ``input_scale``/``input_offset``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tgi_npu_backend.models.layers.quant.int8 import float32_to_int64_bits

CT_SCHEMES = ("W8A16", "W8A16-channel", "W8A8", "W8A8-static")
MS_KINDS = ("W8A16", "W8A8", "W8A8_DYNAMIC")
LINEARS = {
    "bloom": ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
              "mlp.dense_4h_to_h"),
    "gemma": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
CALIBRATION = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Pour déguster un ortolan, il faut tout d'abord le faire fondre.",
    "深度学习模型在昇腾处理器上运行。",
]


def _copy_side_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)


def _input_ranges(src: Path, names: list[str]) -> dict[str, tuple[float, float]]:
    """min/max of each named linear's input over ``CALIBRATION`` (HF transformers, float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    ranges: dict[str, tuple[float, float]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name in names:
            def hook(mod, args, name=name):
                x = args[0].detach()
                lo, hi = ranges.get(name, (0.0, 0.0))
                ranges[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for text in CALIBRATION:
            model(**tok(text, return_tensors="pt"))
    for h in hooks:
        h.remove()
    return ranges


# ---- compressed-tensors ----------------------------------------------------------------------
def compressed_tensors_checkpoint(src: Path, out: Path, scheme: str) -> Path:
    """``scheme``: ``W8A16`` (llmcompressor's preset: int8 weights, groups of 128), ``W8A16-channel``,
    ``W8A8`` (preset: per-channel weights, dynamic per-token activations) or ``W8A8-static``
    (per-channel weights, static per-tensor activations from calibration)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    if scheme in ("W8A16", "W8A8"):
        qscheme = preset_name_to_scheme(scheme, ["Linear"])
    elif scheme == "W8A16-channel":
        qscheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="channel"))
    elif scheme == "W8A8-static":
        qscheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True,
                                               strategy="tensor", dynamic=False),
        )
    else:
        raise ValueError(scheme)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head"]
    ranges = _input_ranges(src, linears) if scheme == "W8A8-static" else {}
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head"])
    )
    for name, m in model.named_modules():
        if name not in linears:
            continue
        wargs, w = qscheme.weights, m.weight.data
        if wargs.strategy == "group":
            grouped = w.view(w.shape[0], -1, wargs.group_size)
            lo, hi = grouped.amin(-1), grouped.amax(-1)
        else:
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        scale, zp = calculate_qparams(lo, hi, wargs)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        m.weight_zero_point.data.copy_(zp.reshape(m.weight_zero_point.shape))
        if name in ranges:
            lo_x, hi_x = (torch.tensor([v]) for v in ranges[name])
            scale, zp = calculate_qparams(lo_x, hi_x, qscheme.input_activations)
            m.input_scale.data.copy_(scale.reshape(m.input_scale.shape))
            m.input_zero_point.data.copy_(zp.reshape(m.input_zero_point.shape))
        m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    _copy_side_files(src, out)
    model.save_pretrained(out)
    compressor.update_config(out)
    return out


# ---- msModelSlim: the tool itself --------------------------------------------------------------
def msmodelslim_tool_checkpoint(src: Path, out: Path, kind: str) -> Path:
    """Quantize ``src`` with msModelSlim's Calibrator on the CPU: ``W8A16`` (weights only),
    ``W8A8`` (static per-tensor activations calibrated on ``CALIBRATION``) or ``W8A8_DYNAMIC``."""
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    if model.config.tie_word_embeddings:  # its safetensors writer refuses shared tensors
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    tok = AutoTokenizer.from_pretrained(src)
    calib = [[tok(t, return_tensors="pt")["input_ids"]] for t in CALIBRATION]
    if kind == "W8A16":
        cfg = QuantConfig(w_bit=8, a_bit=16, disable_names=["lm_head"], dev_type="cpu",
                          w_sym=True, mm_tensor=False)
        calib = None
    else:
        cfg = QuantConfig(w_bit=8, a_bit=8, disable_names=["lm_head"], dev_type="cpu",
                          act_method=1, pr=1.0, w_sym=True, mm_tensor=False,
                          is_dynamic=kind == "W8A8_DYNAMIC")
    _copy_side_files(src, out)
    # NOTE: the calibrator writes a features.npy into the current directory
    with contextlib.chdir(out):
        calibrator = Calibrator(model, cfg, calib_data=calib, disable_level="L0")
        calibrator.run()
        calibrator.save(str(out), save_type=["safe_tensor"])
        Path("features.npy").unlink(missing_ok=True)
    return out


# ---- msModelSlim (from its documentation) ----------------------------------------------------
def msmodelslim_checkpoint(src: Path, out: Path, kind: str, arch: str) -> Path:
    """``kind``: W8A16 (asymmetric per-channel weights), W8A8 (symmetric per-channel weights,
    asymmetric static per-tensor activations; float16 form: ``deq_scale`` as int64 bits,
    ``input_scale``/``input_offset`` float16) or W8A8_DYNAMIC."""
    state = load_file(str(src / "model.safetensors"))
    prefix = "transformer.h" if arch == "bloom" else "model.layers"
    layers = sorted({k.split(".")[2] for k in state if k.startswith(prefix + ".")}, key=int)
    names = [f"{prefix}.{i}.{lin}" for i in layers for lin in LINEARS[arch]]
    ranges = _input_ranges(src, names) if kind == "W8A8" else {}
    desc = {"model_quant_type": kind, **{k: "FLOAT" for k in state}}
    for name in names:
        w = state[f"{name}.weight"].float()
        new: dict[str, torch.Tensor] = {}
        if kind == "W8A16":
            lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
            scale = (hi - lo) / 255
            offset = torch.round(-128 - lo / scale)
            q = torch.round(w / scale + offset).clamp(-128, 127)
            new = {"weight": q.to(torch.int8), "weight_scale": scale.squeeze(1),
                   "weight_offset": offset.squeeze(1)}
        else:
            scale = w.abs().amax(1, keepdim=True) / 127
            q = torch.round(w / scale).clamp(-127, 127)
            new = {"weight": q.to(torch.int8)}
            if kind == "W8A8_DYNAMIC":
                new |= {"weight_scale": scale, "weight_offset": torch.zeros_like(scale)}
            else:
                lo, hi = min(ranges[name][0], 0.0), max(ranges[name][1], 0.0)
                in_scale = torch.tensor([(hi - lo) / 255]).half()
                in_offset = torch.round(-128 - lo / in_scale.float()).half()
                deq = (in_scale.float() * scale.squeeze(1)).float()
                bias = state.get(f"{name}.bias", torch.zeros(w.shape[0])).float()
                rowsum = q.sum(1)
                quant_bias = torch.round(bias / deq) - in_offset.float() * rowsum
                new = {"weight": q.to(torch.int8), "input_scale": in_scale,
                       "input_offset": in_offset, "deq_scale": float32_to_int64_bits(deq),
                       "quant_bias": quant_bias.to(torch.int32)}
        for suffix, t in new.items():
            state[f"{name}.{suffix}"] = t.contiguous()
            desc[f"{name}.{suffix}"] = kind
    _copy_side_files(src, out)
    save_file(state, str(out / f"quant_model_weight_{kind.lower()}.safetensors"))
    (out / f"quant_model_description_{kind.lower()}.json").write_text(json.dumps(desc, indent=2))
    return out
