"""Tensor-parallel process group: who am I, how many of us, and the two collectives layers need.

World size 1 needs no process group: every collective is then the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# The backend that carries collectives for each device type.
DIST_BACKENDS = {"cpu": "gloo", "npu": "hccl", "cuda": "nccl"}


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = field(default=None, compare=False)

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (row-parallel outputs)."""
        if self.is_parallel:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``[..., n]`` shard into ``[..., world_size * n]``."""
        if not self.is_parallel:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def barrier(self) -> None:
        if self.is_parallel:
            dist.barrier(group=self.group)

    def split(self, size: int, what: str) -> int:
        """This rank's share of a model dimension; refuses dimensions that do not divide."""
        if size % self.world_size != 0:
            raise ValueError(
                f"{what} = {size} is not divisible by the tensor-parallel world size "
                f"{self.world_size}; choose a --num-shard that divides it"
            )
        return size // self.world_size


def init_parallel(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device_type: str,
    timeout_s: float = 600.0,
) -> ParallelContext:
    """Join the tensor-parallel group described by the launcher's environment."""
    if world_size <= 1:
        return ParallelContext()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=DIST_BACKENDS.get(device_type, "gloo"),
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return ParallelContext(rank=rank, world_size=world_size, group=dist.group.WORLD)
