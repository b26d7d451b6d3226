"""What a quantized checkpoint (or ``--quantize eetq``) asks of each linear layer.

``QuantConfig`` is built once at startup (``detect.py``) and handed to the models; each
column/row-parallel linear asks it, at load time, for the ``LinearScheme`` of its checkpoint
prefix (``None``: the layer stays float, e.g. msModelSlim ``FLOAT`` layers or compressed-tensors'
``ignore`` list).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

FORMATS = ("eetq", "compressed-tensors", "msmodelslim")
ACTIVATIONS = ("none", "dynamic", "static")  # W8A16, W8A8 per-token, W8A8 per-tensor
OPS = ("cpu", "npu", "reference")


@dataclass(frozen=True)
class LinearScheme:
    format: str  # one of FORMATS: which tensors the checkpoint holds for this layer
    activations: str = "none"  # one of ACTIVATIONS
    group_size: int | None = None  # weight scales per group of input columns (None: per row)
    packed: bool = False  # compressed-tensors pack-quantized (int32 words of four int8)

    def __post_init__(self) -> None:
        assert self.format in FORMATS and self.activations in ACTIVATIONS, self

    @property
    def label(self) -> str:
        """``w8a16``, ``w8a8-dynamic`` or ``w8a8-static``."""
        return "w8a16" if self.activations == "none" else f"w8a8-{self.activations}"


def _matches(pattern: str, names: Iterable[str]) -> bool:
    """compressed-tensors target/ignore syntax: ``re:REGEX`` (matched against the module name)
    or an exact module name; the class name ``Linear`` matches every linear layer."""
    if pattern == "Linear":
        return True
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.match(n) for n in names)
    return any(n == pattern for n in names)


@dataclass(frozen=True)
class SchemeGroup:
    targets: tuple[str, ...]
    scheme: LinearScheme


@dataclass(frozen=True)
class QuantConfig:
    method: str  # one of FORMATS, the --quantize value that runs
    groups: tuple[SchemeGroup, ...] = ()  # first matching group wins
    ignore: tuple[str, ...] = ()  # layers that stay float (compressed-tensors)
    per_layer: Mapping[str, LinearScheme | None] = field(default_factory=dict)  # msModelSlim
    ops: str = "cpu"  # which kernels run the int8 layers (OPS); set by the startup code

    def __post_init__(self) -> None:
        assert self.method in FORMATS and self.ops in OPS, self

    def scheme_for(self, names: Iterable[str]) -> LinearScheme | None:
        """The scheme of the layer known on disk under any of ``names`` (module names, without
        ``.weight``); ``None`` when it stays float."""
        names = list(names)
        if self.method == "msmodelslim":
            for name in names:
                if name in self.per_layer:
                    return self.per_layer[name]
            return None
        if any(_matches(p, names) for p in self.ignore):
            return None
        for group in self.groups:
            if any(_matches(t, names) for t in group.targets):
                return group.scheme
        return None

    @property
    def labels(self) -> list[str]:
        found = [g.scheme.label for g in self.groups]
        found += [s.label for s in self.per_layer.values() if s is not None]
        return sorted(set(found))

    @property
    def description(self) -> str:
        """For the startup log and Info: e.g. ``compressed-tensors w8a8-static``."""
        return f"{self.method} {'+'.join(self.labels) or 'float'}"
