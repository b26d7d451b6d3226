"""``Int8Linear``: one layer's int8 tensors in the one layout every format is converted to."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class Int8Linear:
    """This rank's slice of one (possibly merged) linear layer.

    ``w = (qweight - w_offset) * w_scale`` per group of input columns; ``y = x @ w^T``.
    Static activations: part ``p`` (a block of output rows of a merged layer, e.g. q/k/v) has its
    own ``x_q = clamp(round(x / in_scale[p] + in_offset[p]))``, and
    ``y = (x_q @ qweight^T + qbias) * deq_scale`` (msModelSlim's formula; compressed-tensors'
    static scheme is the case ``deq_scale = in_scale * w_scale``, ``qbias = -in_offset * rowsum``).
    """

    activations: str  # "none" | "dynamic" | "static"
    qweight: Tensor  # [N, K] int8 (ops may keep another layout, see ``ops_*.prepare``)
    w_scale: Tensor | None  # [N, G] float32 (None: msModelSlim static W8A8 without it)
    w_offset: Tensor | None = None  # [N, G] float32, None = symmetric
    part_rows: tuple[int, ...] = ()  # static: output rows per part (sum = N)
    in_scale: Tensor | None = None  # [P] float32, static
    in_offset: Tensor | None = None  # [P] float32, static (integers)
    deq_scale: Tensor | None = None  # [N] float32, static
    qbias: Tensor | None = None  # [N] int32, static: added once (row-parallel: on one rank)
    group_major: bool = False  # qweight stored [G, N, K / G] (the CPU per-group kernels' layout)
    extra: dict[str, Tensor] = field(default_factory=dict)  # what the kernels precompute

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1] if self.group_major else self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        if self.group_major:
            return self.qweight.shape[0] * self.qweight.shape[2]
        return self.qweight.shape[1]

    @property
    def group_size(self) -> int | None:
        if self.w_scale is None or self.w_scale.shape[1] == 1:
            return None
        return self.in_features // self.w_scale.shape[1]

    def weight_nk(self) -> Tensor:
        """``qweight`` as ``[N, K]`` (a copy when stored group-major)."""
        if not self.group_major:
            return self.qweight
        return self.qweight.permute(1, 0, 2).reshape(self.out_features, self.in_features)

    def tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name) for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }

    def nbytes(self) -> int:
        tensors = [*self.tensors().values(), *self.extra.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device) -> Int8Linear:
        for name, t in self.tensors().items():
            setattr(self, name, t.to(device))
        return self

    def permute_rows(self, index: Tensor) -> None:
        """Reorder output rows (BLOOM's fused QKV un-interleaving) in every per-row tensor."""
        if self.part_rows and len(self.part_rows) > 1:
            raise ValueError("cannot permute the rows of a layer with several static input scales")
        assert not self.group_major, "permute rows before the kernels prepare the layer"
        for name in ("qweight", "w_scale", "w_offset", "deq_scale", "qbias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)).contiguous())
