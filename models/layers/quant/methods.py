"""The linear-method seam: a quantized column/row-parallel linear holds an ``Int8Method`` (its
``Int8Linear``, run by the kernels of ``QuantConfig.ops``: cpu, npu, or the float64 reference)
and does not know which format or scheme it came from; a linear without one runs its float
weight (oneDNN on CPU)."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from torch import Tensor, nn

from tgi_npu_backend.weights import Weights

from .loaders import Layout, load_int8
from .scheme import LinearScheme
from .tensors import Int8Linear

_OPS_MODULES = {
    "cpu": "tgi_npu_backend.models.layers.quant.ops_cpu",
    "reference": "tgi_npu_backend.models.layers.quant.ops_reference",
    "npu": "tgi_npu_backend.kernels.npu_quant",
}


def get_ops(name: str) -> ModuleType:
    """The kernels module for ``name`` (``prepare(t)``, ``matmul(x, t, add_qbias)``)."""
    return import_module(_OPS_MODULES[name])


class Int8Method:
    """Int8 weights (and int8 activations for W8A8) of one linear layer."""

    def __init__(self, scheme: LinearScheme, ops: str) -> None:
        self.scheme = scheme
        self.ops = get_ops(ops)
        self.int8: Int8Linear | None = None

    @property
    def name(self) -> str:
        return f"{self.scheme.format} {self.scheme.label}"

    # NOTE: msModelSlim W8A8's quant_bias already holds the float bias (round(bias / deq_scale),
    # checked on msModelSlim 26.1.0's own export in test_msmodelslim_format.py; vllm-ascend's
    # static W8A8 method likewise passes quant_bias only); the float bias is consumed, not added.
    @property
    def keeps_float_bias(self) -> bool:
        return not (self.scheme.format == "msmodelslim" and self.scheme.activations == "static")

    def load(self, layer: nn.Module, weights: Weights, layout: Layout) -> None:
        self.int8 = load_int8(weights, self.scheme, layout)
        self.ops.prepare(self.int8)
        _register(layer, self.int8)

    def permute_rows(self, layer: nn.Module, index: Tensor) -> None:
        self._repack(layer, lambda t: t.permute_rows(index))

    def use_ops(self, layer: nn.Module, ops: str) -> None:
        """Run with other kernels (tests: the reference); the int8 values stay the same."""
        self.ops = get_ops(ops)
        self._repack(layer, lambda t: None)

    def _repack(self, layer: nn.Module, change) -> None:
        t = self.int8
        assert t is not None, "load() first"
        t.qweight, t.group_major = t.weight_nk(), False  # back to the [N, K] layout
        t.extra.clear()
        change(t)
        self.ops.prepare(t)
        for name in [n for n in layer._buffers if n.startswith("extra_")]:
            del layer._buffers[name]
        _register(layer, t)

    def apply(self, x: Tensor, add_qbias: bool = True) -> Tensor:
        """``[..., K] -> [..., N_local]`` without the float bias."""
        assert self.int8 is not None, "load() first"
        shape = x.shape
        out = self.ops.matmul(x.reshape(-1, shape[-1]), self.int8, add_qbias)
        return out.view(*shape[:-1], out.shape[-1])


def _register(layer: nn.Module, t: Int8Linear) -> None:
    """The int8 tensors as non-persistent buffers (so module.buffers() counts them)."""
    for name, tensor in {**t.tensors(), **{f"extra_{k}": v for k, v in t.extra.items()}}.items():
        if name in layer._buffers or not hasattr(layer, name):
            layer.register_buffer(name, tensor, persistent=False)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the weights take in memory)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN-packed weights have no storage
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total

