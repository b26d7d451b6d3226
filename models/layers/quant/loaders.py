"""Read one linear layer's int8 tensors, this rank's slice only, into ``Int8Linear``.

Tensor names per format (``{prefix}.<name>``):
* eetq (a float checkpoint): ``weight``, quantized here (``int8.quantize_weight_per_channel``).
* compressed-tensors: ``weight`` int8 [N, K] (int-quantized) or ``weight_packed`` int32
  [N, K/4] + ``weight_shape`` (pack-quantized); ``weight_scale`` [N, 1] or [N, K/group];
  ``input_scale`` [1] for static activations.
* msModelSlim (its weight-format documentation): ``weight`` int8 [N, K]; W8A16 and
  W8A8_DYNAMIC: ``weight_scale``/``weight_offset`` [N] or [N, 1] (or [N, K/group]),
  ``w = (weight - weight_offset) * weight_scale``; W8A8: ``input_scale``/``input_offset`` [1],
  ``deq_scale`` [N] (float32, or for float16 models the float32 bits in an int64),
  ``quant_bias`` [N] int32, optionally ``weight_scale``/``weight_offset`` as well.

Tensor parallelism: column-parallel parts read their block of output rows (weights, per-row
scales, ``deq_scale``, ``quant_bias``); row-parallel layers read their block of input columns
(weights, per-group scales) and replicate per-row and per-tensor values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tgi_npu_backend.weights import Weights

from .int8 import int64_to_float32_bits, quantize_weight_per_channel, unpack_int32_int8
from .scheme import LinearScheme
from .tensors import Int8Linear

Shard = tuple[int, int]


@dataclass(frozen=True)
class Part:
    prefix: str  # the checkpoint name of this part's layer (without ".weight")
    out_features: int  # full size
    shard: Shard = (0, 1)  # this rank's block of output rows


@dataclass(frozen=True)
class Layout:
    """Where this rank's slice of a (merged) linear layer lies in the checkpoint."""

    parts: tuple[Part, ...]
    in_features: int  # full size
    in_shard: Shard = (0, 1)  # row-parallel: (rank, world) block of input columns


class _Reader:
    def __init__(self, weights: Weights, layout: Layout, part: Part) -> None:
        self.w, self.layout, self.part = weights, layout, part
        self.n, self.k = part.out_features, layout.in_features

    def name(self, suffix: str) -> str:
        return f"{self.part.prefix}.{suffix}"

    def has(self, suffix: str) -> bool:
        return self.w.has(self.name(suffix))

    def matrix(self, suffix: str, columns: int | None = None) -> Tensor:
        """[N, columns] (default K): this rank's rows (column-parallel) or columns (row-parallel)."""
        shape = (self.n, self.k if columns is None else columns)
        (ri, rc), (ci, cc) = self.part.shard, self.layout.in_shard
        if rc > 1:
            return self.w.get_shard(self.name(suffix), 0, ri, rc, shape, keep_dtype=True)
        if cc > 1:
            return self.w.get_shard(self.name(suffix), 1, ci, cc, shape, keep_dtype=True)
        return self.w.get(self.name(suffix), shape, keep_dtype=True)

    def per_row(self, suffix: str) -> Tensor:
        """A per-output-row value stored as [N] or [N, 1] -> this rank's rows, [n]."""
        name = self.name(suffix)
        found = self.w.shape(name)
        if found not in ((self.n,), (self.n, 1)):
            raise ValueError(f"tensor {name!r} has shape {list(found)}; expected [{self.n}] or "
                             f"[{self.n}, 1] (one value per output channel)")
        ri, rc = self.part.shard
        t = self.w.get_shard(name, 0, ri, rc, found, keep_dtype=True)
        return t.reshape(-1)

    def per_group(self, suffix: str) -> Tensor:
        """Weight scales/offsets: [N], [N, 1] (per channel) or [N, G] (per group) -> [n, g]."""
        name = self.name(suffix)
        found = self.w.shape(name)
        if found in ((self.n,), (self.n, 1)):
            return self.per_row(suffix).unsqueeze(1)
        if len(found) != 2 or found[0] != self.n or self.k % found[1]:
            raise ValueError(f"tensor {name!r} has shape {list(found)}; expected [{self.n}, 1] "
                             f"or [{self.n}, groups] with groups dividing {self.k}")
        return self.matrix(suffix, columns=found[1])

    def scalar(self, suffix: str) -> float:
        name = self.name(suffix)
        t = self.w.get(name, keep_dtype=True)
        if t.numel() != 1:
            raise ValueError(f"tensor {name!r} has shape {list(t.shape)}; expected one value "
                             "(per-tensor activation quantization)")
        return float(t.float().reshape(()))


def _float_part(r: _Reader, scheme: LinearScheme) -> dict:
    """eetq: quantize this rank's slice with scales of whole rows (a row-parallel rank reads the
    full rows to find them, so every rank's slice equals the slice of the whole weight's
    quantization)."""
    ci, cc = r.layout.in_shard
    if cc > 1:
        q, scale = quantize_weight_per_channel(r.w.get(r.name("weight"), (r.n, r.k)))
        block = r.k // cc
        q = q[:, ci * block : (ci + 1) * block].contiguous()
    else:
        q, scale = quantize_weight_per_channel(r.matrix("weight"))
    return {"qweight": q, "w_scale": scale}


def _ct_part(r: _Reader, scheme: LinearScheme) -> dict:
    if scheme.packed:
        shape = r.w.get(r.name("weight_shape")).tolist()
        if [int(s) for s in shape] != [r.n, r.k]:
            raise ValueError(f"{r.name('weight_shape')} is {shape}; the model expects {[r.n, r.k]}")
        if r.k % 4 or (r.k // r.layout.in_shard[1]) % 4:
            raise ValueError(f"{r.part.prefix}: {r.k} input features do not pack into int32 words "
                             "per tensor-parallel shard; use fewer shards")
        q = unpack_int32_int8(r.matrix("weight_packed", columns=(r.k + 3) // 4).to(torch.int32),
                              r.k // r.layout.in_shard[1])
    else:
        q = r.matrix("weight")
    out = {"qweight": q, "w_scale": r.per_group("weight_scale").float()}
    groups = out["w_scale"].shape[1]  # one group over the whole row is a per-channel scale
    if scheme.group_size is not None and groups > 1 and q.shape[1] // groups != scheme.group_size:
        raise ValueError(f"{r.name('weight_scale')}: {out['w_scale'].shape[1]} groups over "
                         f"{q.shape[1]} columns, but config.json says group_size "
                         f"{scheme.group_size}")
    if scheme.activations == "static":
        out["in_scale"] = r.scalar("input_scale")
        out["in_offset"] = 0.0
        out["deq_scale"] = out["w_scale"][:, 0] * out["in_scale"]
    return out


def _msmodelslim_part(r: _Reader, scheme: LinearScheme) -> dict:
    out: dict = {"qweight": r.matrix("weight")}
    if scheme.activations == "static":
        out["in_scale"] = r.scalar("input_scale")
        out["in_offset"] = r.scalar("input_offset")
        out["deq_scale"] = int64_to_float32_bits(r.per_row("deq_scale"))
        out["qbias"] = r.per_row("quant_bias").to(torch.int32)
        for extra in ("weight_scale", "weight_offset"):  # written by newer releases, not needed
            if r.has(extra):
                r.per_row(extra)
        out["w_scale"] = None
        return out
    out["w_scale"] = r.per_group("weight_scale").float()
    offset = r.per_group("weight_offset").float() if r.has("weight_offset") else None
    if offset is not None and bool(offset.any()):
        if scheme.activations != "none":
            raise ValueError(f"{r.name('weight_offset')}: asymmetric weights with dynamic "
                             "activations are not supported (msModelSlim writes zeros here)")
        out["w_offset"] = offset
    return out


_PARTS = {"eetq": _float_part, "compressed-tensors": _ct_part, "msmodelslim": _msmodelslim_part}


def load_int8(weights: Weights, scheme: LinearScheme, layout: Layout) -> Int8Linear:
    """This rank's ``Int8Linear`` for ``layout`` (every part of a merged layer)."""
    parts = [_PARTS[scheme.format](_Reader(weights, layout, p), scheme) for p in layout.parts]
    cat = _concat
    layer = Int8Linear(
        activations=scheme.activations,
        qweight=cat([p["qweight"].to(torch.int8) for p in parts]),
        w_scale=None if parts[0]["w_scale"] is None else cat([p["w_scale"] for p in parts]),
    )
    if any("w_offset" in p for p in parts):  # zeros for the parts that are symmetric
        layer.w_offset = cat([p.get("w_offset", torch.zeros_like(p["w_scale"])) for p in parts])
    if scheme.activations == "static":
        layer.part_rows = tuple(p["qweight"].shape[0] for p in parts)
        layer.in_scale = torch.tensor([p["in_scale"] for p in parts], dtype=torch.float32)
        layer.in_offset = torch.tensor([p["in_offset"] for p in parts], dtype=torch.float32)
        layer.deq_scale = cat([p["deq_scale"].float() for p in parts])
        if any("qbias" in p for p in parts):
            layer.qbias = cat([p["qbias"] for p in parts])
        if bool((layer.in_scale <= 0).any()):
            raise ValueError(f"{layout.parts[0].prefix}: input_scale must be positive, found "
                             f"{layer.in_scale.tolist()}")
    # NOTE: own every tensor: one read straight from a safetensors file may sit at any address,
    # and the CPU int8 kernels crash on an int8 weight that is not 64-byte aligned (torch 2.13).
    for name, t in layer.tensors().items():
        setattr(layer, name, t.to(weights.device).clone())
    return layer


def _concat(tensors: Sequence[Tensor | None]) -> Tensor:
    if any(t is None for t in tensors):
        raise ValueError("the parts of a merged layer mix quantization parameters; quantize "
                         "them with one scheme")
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=0).contiguous()
