"""Generated protobuf/gRPC stubs for the TGI v3 protocol (``proto/generate.proto``).

``generate_pb2`` and ``generate_pb2_grpc`` are imported lazily on first attribute access, so
``python -m tgi_npu_backend.pb.regenerate`` still runs when the stubs are missing or broken.
Regenerate them with that command; never edit the ``generate_pb2*`` files by hand
(``tests/shard/test_proto.py`` fails when they are stale).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["generate_pb2", "generate_pb2_grpc"]

if TYPE_CHECKING:  # pragma: no cover
    from . import generate_pb2, generate_pb2_grpc


def __getattr__(name: str):
    if name in __all__:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
