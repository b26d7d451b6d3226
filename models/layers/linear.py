"""Tensor-parallel linear layers (Megatron style; world size 1 => plain ``F.linear``).

* ``ColumnParallelLinear`` splits the output features: each rank reads a block of weight rows and
  produces a slice of the output, no communication.
* ``MergedColumnParallelLinear`` runs several column-parallel projections of one input as one
  matmul (Gemma gate/up, q/k/v); each part is sharded on its own.
* ``RowParallelLinear`` splits the input features: each rank reads a block of weight columns, the
  partial outputs are summed with ``all_reduce``, and the bias is added once, after the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgi_npu_backend.distributed import ParallelContext, shard_size
from tgi_npu_backend.weights import Weights

Shard = tuple[int, int]  # (index, count): this rank holds block `index` of `count` equal blocks


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


# NOTE: measured on the 2-core AVX-512 CPU this project benchmarks on, float32: oneDNN's linear
# (``mkldnn._linear_pointwise``, what Inductor uses on CPU; weights as they are, no repacking) is
# 1.25-1.9x faster than ``F.linear``'s MKL sgemm at every size the models run: 24 BLOOM-560m
# projections at 1 row 20 vs 30 ms, at 32 rows 55 vs 74 ms, at 3328 rows 4.6 vs 5.9 s; the
# 250k-row LM head at 1 row 52 vs 86 ms (a GEMV at ~20 GB/s), at 32 rows 150 vs 189 ms.
ONEDNN_LINEAR = _onednn_linear_available()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; float32 on CPU through oneDNN (see the NOTE above)."""
    if (
        ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _param(*shape: int, dtype: torch.dtype | None, device: torch.device | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


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
        self.weight = _param(total, in_features, dtype=dtype, device=device)  # [out_local, in]
        self.bias = _param(total, dtype=dtype, device=device) if bias else None

    def load(self, weights: Weights, prefixes: Sequence[str]) -> None:
        """Read ``{prefix}.weight`` (and ``.bias``) of every part; only this rank's rows."""
        start = 0
        for prefix, size, local, (index, count) in zip(
            prefixes, self.full_out, self.local_out, self.shards, strict=True
        ):
            w = weights.get_shard(f"{prefix}.weight", 0, index, count, (size, self.in_features))
            self.weight.data[start : start + local].copy_(w)
            if self.bias is not None:
                b = weights.get_shard(f"{prefix}.bias", 0, index, count, (size,))
                self.bias.data[start : start + local].copy_(b)
            start += local

    def forward(self, x: Tensor) -> Tensor:  # [T, in] -> [T, sum(local_out)]
        return linear(x, self.weight, self.bias)


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
    ) -> None:
        super().__init__(
            in_features,
            [out_features],
            parallel=parallel,
            bias=bias,
            shards=[shard] if shard else None,
            dtype=dtype,
            device=device,
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
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.in_features = in_features
        self.out_features = out_features
        local_in = _split(in_features, parallel.world_size, "input features")
        self.weight = _param(out_features, local_in, dtype=dtype, device=device)  # [out, in_local]
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def load(self, weights: Weights, prefix: str) -> None:
        shape = (self.out_features, self.in_features)
        self.weight.data.copy_(weights.get_sharded(f"{prefix}.weight", 1, shape))
        if self.bias is not None:
            # The bias is not sharded: every rank reads it, and adds it after the reduction.
            self.bias.data.copy_(weights.get(f"{prefix}.bias", (self.out_features,)))

    def forward(self, x: Tensor) -> Tensor:
        if not self.parallel.is_parallel:
            return linear(x, self.weight, self.bias)
        out = self.parallel.all_reduce(linear(x, self.weight))
        if self.bias is not None:
            out = out + self.bias
        return out
