"""Tensor-parallel linear layers (Megatron style; world size 1 => plain ``F.linear``).

* ``ColumnParallelLinear`` splits the output features: each rank reads a block of weight rows and
  produces a slice of the output, no communication.
* ``MergedColumnParallelLinear`` runs several column-parallel projections of one input as one
  matmul (Gemma gate/up, q/k/v); each part is sharded on its own.
* ``RowParallelLinear`` splits the input features: each rank reads a block of weight columns, the
  partial outputs are summed with ``all_reduce``, and the bias is added once, after the sum.

Quantization is a seam, not a model change: built with a ``QuantConfig``, a linear asks it at
load time for the scheme of its checkpoint layer and, when there is one, keeps an ``Int8Method``
(``quant/methods.py``) instead of a float weight; the models stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgi_npu_backend.distributed import ParallelContext, shard_size
from tgi_npu_backend.models.layers.cpu_gemm import ONEDNN_LINEAR, PACKED, GemmProfile, onednn
from tgi_npu_backend.models.layers.quant.loaders import Layout, Part
from tgi_npu_backend.models.layers.quant.methods import Int8Method
from tgi_npu_backend.models.layers.quant.scheme import LinearScheme, QuantConfig
from tgi_npu_backend.weights import Weights

Shard = tuple[int, int]  # (index, count): this rank holds block `index` of `count` equal blocks


def _bf16_onednn_available() -> bool:
    try:
        return ONEDNN_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


BF16_ONEDNN = _bf16_onednn_available()  # packing.py packs bfloat16 weights only with these


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gemm: GemmProfile = PACKED) -> Tensor:
    """``F.linear(x, weight, bias)``. On the CPU: a weight ``packing.pack_cpu_weights`` reordered
    (float32 or bfloat16) runs through oneDNN; a plain float32 one through the kernel ``gemm``
    chose for this many rows (``cpu_gemm.py``: oneDNN by default)."""
    if weight.is_mkldnn:
        return onednn(x, weight, bias)
    if (
        ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
    ):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return gemm.kernel(rows)(x, weight, bias)
    return F.linear(x, weight, bias)


def _param(*shape: int, dtype: torch.dtype | None, device: torch.device | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def _scheme(
    quant: QuantConfig | None, weights: Weights, prefixes: Sequence[str]
) -> LinearScheme | None:
    """The one scheme of every part of a layer (``None``: float)."""
    if quant is None:
        return None
    found = [
        quant.scheme_for(n.removesuffix(".weight") for n in weights.resolver(f"{p}.weight"))
        for p in prefixes
    ]
    if any(f != found[0] for f in found):
        raise ValueError(
            f"{', '.join(prefixes)} are one fused layer here but are quantized differently in the "
            f"checkpoint ({', '.join(f.label if f else 'float' for f in found)}); quantize them alike"
        )
    return found[0]


def _split(size: int, count: int, what: str) -> int:
    return shard_size(size, count, what)


class MergedColumnParallelLinear(nn.Module):
    """``y = x @ [W_0; W_1; ...]^T`` with each ``W_i`` sharded by rows on its own.

    ``shards[i]`` says which block of part ``i`` this rank holds (default: ``(rank, world)``);
    a replicated KV head is ``(kv_index, num_kv_heads)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Sequence[int],
        *,
        parallel: ParallelContext,
        bias: bool = False,
        shards: Sequence[Shard] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        quant: QuantConfig | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.full_out = list(out_features)
        self.shards = list(shards or [(parallel.rank, parallel.world_size)] * len(self.full_out))
        self.local_out = [
            _split(size, count, "output features")
            for size, (_, count) in zip(self.full_out, self.shards, strict=True)
        ]
        total = sum(self.local_out)
        self.quant = quant
        self.gemm = PACKED  # the float32 CPU kernels; packing.pack_cpu_weights sets the measured ones
        self.method: Int8Method | None = None
        self._float = (total, in_features, dtype, device)
        # Quantized configs allocate at load time: a float weight only for a layer kept float.
        self.weight = None if quant else _param(total, in_features, dtype=dtype, device=device)
        self.bias = _param(total, dtype=dtype, device=device) if bias else None

    def load(self, weights: Weights, prefixes: Sequence[str]) -> None:
        """Read ``{prefix}.weight`` (and ``.bias``) of every part; only this rank's rows."""
        scheme = _scheme(self.quant, weights, prefixes)
        if scheme is not None:
            self.method = Int8Method(scheme, self.quant.ops)
            parts = tuple(
                Part(p, size, shard) for p, size, shard in zip(prefixes, self.full_out, self.shards)
            )
            self.method.load(self, weights, Layout(parts, self.in_features))
        elif self.weight is None:
            total, k, dtype, device = self._float
            self.weight = _param(total, k, dtype=dtype, device=device)  # [out_local, in]
        start = 0
        for prefix, size, local, (index, count) in zip(
            prefixes, self.full_out, self.local_out, self.shards, strict=True
        ):
            if scheme is None:
                w = weights.get_shard(f"{prefix}.weight", 0, index, count, (size, self.in_features))
                self.weight.data[start : start + local].copy_(w)
            if self.bias is not None:
                b = weights.get_shard(f"{prefix}.bias", 0, index, count, (size,))
                self.bias.data[start : start + local].copy_(b)
            start += local
        if self.method is not None and not self.method.keeps_float_bias and self.bias is not None:
            self.bias = None  # read (so the checkpoint is fully consumed) but carried by the method

    def permute_out_rows(self, index: Tensor) -> None:
        """Reorder this rank's output rows (weights, scales and bias alike)."""
        if self.method is not None:
            self.method.permute_rows(self, index)
        else:
            self.weight.data.copy_(self.weight.data.index_select(0, index))
        if self.bias is not None:
            self.bias.data.copy_(self.bias.data.index_select(0, index))

    def forward(self, x: Tensor) -> Tensor:  # [T, in] -> [T, sum(local_out)]
        if self.method is None:
            return linear(x, self.weight, self.bias, self.gemm)
        out = self.method.apply(x)
        return out if self.bias is None else out + self.bias


class ColumnParallelLinear(MergedColumnParallelLinear):
    """One column-parallel projection: ``[T, in] -> [T, out / shards]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        parallel: ParallelContext,
        bias: bool = False,
        shard: Shard | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        quant: QuantConfig | None = None,
    ) -> None:
        super().__init__(
            in_features,
            [out_features],
            parallel=parallel,
            bias=bias,
            shards=[shard] if shard else None,
            dtype=dtype,
            device=device,
            quant=quant,
        )

    def load(self, weights: Weights, prefix: str) -> None:  # type: ignore[override]
        super().load(weights, [prefix])


class RowParallelLinear(nn.Module):
    """``[T, in / world] -> [T, out]``: partial matmul, ``all_reduce``, then the bias once."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        parallel: ParallelContext,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        quant: QuantConfig | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.in_features = in_features
        self.out_features = out_features
        local_in = _split(in_features, parallel.world_size, "input features")
        self.quant = quant
        self.gemm = PACKED  # as in MergedColumnParallelLinear
        self.method: Int8Method | None = None
        self._float = (out_features, local_in, dtype, device)
        self.weight = (  # [out, in_local]
            None if quant else _param(out_features, local_in, dtype=dtype, device=device)
        )
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def load(self, weights: Weights, prefix: str) -> None:
        scheme = _scheme(self.quant, weights, [prefix])
        if scheme is not None:
            self.method = Int8Method(scheme, self.quant.ops)
            layout = Layout(
                (Part(prefix, self.out_features),),
                self.in_features,
                (self.parallel.rank, self.parallel.world_size),
            )
            self.method.load(self, weights, layout)
        else:
            if self.weight is None:
                n, k, dtype, device = self._float
                self.weight = _param(n, k, dtype=dtype, device=device)
            shape = (self.out_features, self.in_features)
            self.weight.data.copy_(weights.get_sharded(f"{prefix}.weight", 1, shape))
        if self.bias is not None:
            # The bias is not sharded: every rank reads it, and adds it after the reduction.
            self.bias.data.copy_(weights.get(f"{prefix}.bias", (self.out_features,)))
            if self.method is not None and not self.method.keeps_float_bias:
                self.bias = None  # carried by the method (msModelSlim W8A8 quant_bias)

    def _matmul(self, x: Tensor) -> Tensor:
        if self.method is None:
            return linear(x, self.weight, gemm=self.gemm)
        # a per-layer integer bias (msModelSlim quant_bias) is added by one rank only
        return self.method.apply(x, add_qbias=self.parallel.rank == 0)

    def forward(self, x: Tensor) -> Tensor:
        if not self.parallel.is_parallel and self.method is None:
            return linear(x, self.weight, self.bias, self.gemm)
        out = self._matmul(x)
        if self.parallel.is_parallel:
            out = self.parallel.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
