"""Tensor-parallel process group: who am I, how many of us, the collectives layers need, and how
a rank notices that a peer has gone.

World size 1 needs no process group: every collective is then the identity.

A rank set must never hang on a dead peer (the launcher only tears the set down once *a* shard
exits). Two mechanisms, both bounded by ``--dist-timeout`` (``TGI_NPU_DIST_TIMEOUT``):
* a collective that fails (gloo reports a closed connection at once) or times out raises
  :class:`FatalError`, which shuts this shard down;
* :class:`PeerWatchdog` heartbeats through the rendezvous store, so an *idle* rank (no RPC in
  flight, hence no collective) also notices a peer that died, and exits.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from loguru import logger

from .errors import FatalError

# The backend that carries collectives for each device type.
DIST_BACKENDS = {"cpu": "gloo", "npu": "hccl", "cuda": "nccl"}



def shard_size(size: int, count: int, what: str) -> int:
    """``size / count``: the one tensor-parallel divisibility check (model dimensions, weight
    slices, heads); refuses, naming the dimension, a world size that does not divide it."""
    if size % count != 0:
        raise ValueError(
            f"{what} = {size} is not divisible by the tensor-parallel world size {count}; "
            "choose a --num-shard that divides it"
        )
    return size // count

@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = field(default=None, compare=False)
    watchdog: PeerWatchdog | None = field(default=None, compare=False, repr=False)

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def _collective(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, group=self.group, **kwargs)
        except Exception as err:  # gloo: RuntimeError "Connection closed by peer", timeouts
            raise FatalError(
                f"tensor-parallel {name} failed on rank {self.rank} of {self.world_size} (a peer rank "
                f"exited or did not answer within --dist-timeout): {err}"
            ) from err

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (row-parallel outputs)."""
        if self.is_parallel:
            self._collective("all_reduce", dist.all_reduce, tensor)
        return tensor

    def all_reduce_min(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over ranks (e.g. a KV block count every rank must agree on)."""
        if not self.is_parallel:
            return value
        # int32: the integer type every collective backend reduces (HCCL included)
        t = torch.tensor([value], dtype=torch.int32, device=device)
        self._collective("all_reduce(MIN)", dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``[..., n]`` shard into ``[..., world_size * n]``."""
        if not self.is_parallel:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective("all_gather", dist.all_gather, parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)

    def barrier(self) -> None:
        if self.is_parallel:
            self._collective("barrier", dist.barrier)

    def split(self, size: int, what: str) -> int:
        """This rank's share of a model dimension; refuses dimensions that do not divide."""
        return shard_size(size, self.world_size, what)

    def shutdown(self) -> None:
        """An orderly exit: stop watching peers (they are shutting down too)."""
        if self.watchdog is not None:
            self.watchdog.stop()


def abort_process(reason: str, remove: Sequence[str] = ()) -> NoReturn:
    """Log ``reason``, remove ``remove`` (the socket), exit 1 *now*.

    NOTE: ``os._exit``, not ``sys.exit``: the generator thread may be blocked in a collective with
    the dead peer, and interpreter shutdown would join it.
    """
    logger.error(f"{reason}; exiting so that the launcher tears the shard set down")
    print(f"Error: {reason}", file=sys.stderr, flush=True)
    for path in remove:
        try:
            os.unlink(path)
        except OSError:
            pass
    sys.stdout.flush()
    os._exit(1)


class PeerWatchdog:
    """Heartbeats through the rendezvous TCPStore (hosted by rank 0) on its own connection.

    Every ``interval`` each rank bumps its counter ``tgi_npu/heartbeat/{rank}``. A peer whose
    counter has not moved for ``timeout_s`` is dead (or hung); a store that stopped answering
    means rank 0 is gone. Either way ``on_lost(reason)`` runs (default: :func:`abort_process`).
    """

    KEY = "tgi_npu/heartbeat/{}"

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        timeout_s: float,
        on_lost: Callable[[str], None] = abort_process,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.interval_s = min(max(timeout_s / 10, 0.1), 2.0)
        self.on_lost = on_lost
        self._stopped = threading.Event()
        # A second client of the store: the process group's own connection is not ours to share.
        self._store = dist.TCPStore(
            master_addr, master_port, is_master=False, timeout=timedelta(seconds=timeout_s)
        )
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)

    def start(self) -> PeerWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        seen = {r: -1 for r in peers}
        changed = {r: time.monotonic() for r in peers}
        while not self._stopped.wait(self.interval_s):
            try:
                self._store.add(self.KEY.format(self.rank), 1)
                counts = {r: self._store.add(self.KEY.format(r), 0) for r in peers}
            except (RuntimeError, OSError) as err:  # DistNetworkError: rank 0 (the store's host) is gone
                if self._stopped.wait(self.interval_s):  # an orderly shutdown raced us
                    return
                self.on_lost(
                    f"rank {self.rank}: lost the rendezvous store hosted by rank 0 ({err}); "
                    "rank 0 has exited"
                )
                return
            now = time.monotonic()
            for r, count in counts.items():
                if count != seen[r]:
                    seen[r], changed[r] = count, now
                elif now - changed[r] > self.timeout_s and not self._stopped.is_set():
                    self.on_lost(
                        f"rank {self.rank}: rank {r} sent no heartbeat for {self.timeout_s:g}s "
                        "(--dist-timeout): it has exited or hung"
                    )
                    return


def init_parallel(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device_type: str,
    timeout_s: float = 600.0,
    on_peer_lost: Callable[[str], None] | None = None,
) -> ParallelContext:
    """Join the tensor-parallel group described by the launcher's environment.

    ``timeout_s`` bounds the rendezvous and every collective. With ``on_peer_lost`` a
    :class:`PeerWatchdog` starts right away (before the model loads, so that a slow load is not
    mistaken for a dead rank).
    """
    if world_size <= 1:
        return ParallelContext()
    backend = DIST_BACKENDS.get(device_type, device_type)  # a device type, or a backend name
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        except Exception as err:  # DistStoreError / DistNetworkError: a peer never came
            raise FatalError(
                f"rank {rank} could not join the {backend} process group of {world_size} ranks at "
                f"tcp://{master_addr}:{master_port} within {timeout_s:g}s: {err}"
            ) from err
    watchdog = None
    if on_peer_lost is not None:
        watchdog = PeerWatchdog(
            rank, world_size, master_addr, master_port, timeout_s, on_peer_lost
        ).start()
    return ParallelContext(rank=rank, world_size=world_size, group=dist.group.WORLD, watchdog=watchdog)
