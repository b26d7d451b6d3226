"""Exception types and how each maps to a gRPC status.

Only :class:`FatalError` and device out-of-memory errors shut the shard down (the launcher then
tears the whole set down). Everything else fails the one RPC; the router reports it to the
requests of that batch and the shard keeps serving.
"""

from __future__ import annotations

import grpc
import torch


class InvalidRequestError(ValueError):
    """A request the shard cannot serve as sent (the message says what to change)."""


class BatchNotFoundError(KeyError):
    """A batch id that is not in the shard's batch cache."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "batch not found"


class FatalError(RuntimeError):
    """The shard's state is unusable (device lost, KV pool corrupt): shut down."""


def is_device_oom(err: BaseException) -> bool:
    """Device out-of-memory in either form: ``torch.OutOfMemoryError`` (CUDA, newer torch_npu) or
    the plain ``RuntimeError("NPU out of memory. Tried to allocate ...")`` torch_npu raises from its
    caching allocator."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def grpc_status(err: BaseException) -> tuple[grpc.StatusCode, bool]:
    """(status code, fatal?) for an exception raised by a handler. Device OOM is fatal, as in
    TGI's server (its interceptor exits on RuntimeError): the launcher restarts the set."""
    if isinstance(err, FatalError) or is_device_oom(err):
        return grpc.StatusCode.INTERNAL, True
    if isinstance(err, BatchNotFoundError):
        return grpc.StatusCode.NOT_FOUND, False
    if isinstance(err, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, False
    if isinstance(err, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, False
    return grpc.StatusCode.INTERNAL, False
