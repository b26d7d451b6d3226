"""Regenerate the committed gRPC/protobuf stubs from ``proto/generate.proto``.

Usage (from the repository root)::

    python -m tgi_npu_backend.pb.regenerate            # rewrite tgi_npu_backend/pb/*
    python -m tgi_npu_backend.pb.regenerate --out DIR  # write elsewhere (e.g. to diff)

Runs ``grpc_tools.protoc`` in-process (grpcio-tools is a test/dev dependency, not a runtime
one) and writes ``generate_pb2.py``, ``generate_pb2.pyi`` and ``generate_pb2_grpc.py``. The
gRPC plugin emits ``import generate_pb2 as generate__pb2``, which only works when the output
directory is on ``sys.path``; it is rewritten to a relative import so the stubs live inside
the ``tgi_npu_backend.pb`` package. The output depends only on the proto and the grpcio-tools
version, so ``tests/shard/test_proto.py`` can regenerate into a temporary directory and compare.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PB_DIR = Path(__file__).resolve().parent
REPO_ROOT = PB_DIR.parents[1]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = PROTO_DIR / "generate.proto"

GENERATED_FILES = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")

_ABSOLUTE_IMPORT = "import generate_pb2 as generate__pb2\n"
_RELATIVE_IMPORT = "from . import generate_pb2 as generate__pb2\n"


def _protoc(args: list[str]) -> None:
    """Run protoc in-process with the bundled well-known-type includes."""
    from importlib import resources

    from grpc_tools import protoc

    wkt_include = str(resources.files("grpc_tools") / "_proto")
    argv = ["grpc_tools.protoc", f"-I{wkt_include}", *args]
    rc = protoc.main(argv)
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}): {' '.join(argv)}")


def compile_descriptor_set(proto_file: Path | str = PROTO_FILE) -> bytes:
    """Compile ``proto_file`` and return a serialized ``FileDescriptorSet`` holding only that
    file (no imports), without source info."""
    proto_file = Path(proto_file).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptor_set.pb"
        _protoc([f"-I{proto_file.parent}", f"--descriptor_set_out={out}", str(proto_file)])
        return out.read_bytes()


def generate(out_dir: Path | str = PB_DIR, proto_file: Path | str = PROTO_FILE) -> list[Path]:
    """Generate the three stub files for ``proto_file`` into ``out_dir``; return their paths."""
    proto_file = Path(proto_file).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _protoc([
            f"-I{proto_file.parent}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto_file),
        ])
        grpc_path = Path(tmp) / "generate_pb2_grpc.py"
        text = grpc_path.read_text(encoding="utf-8")
        if text.count(_ABSOLUTE_IMPORT) != 1:
            raise RuntimeError(
                f"expected exactly one {_ABSOLUTE_IMPORT.strip()!r} in generated "
                "generate_pb2_grpc.py; the grpc plugin's output format changed"
            )
        grpc_path.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT), encoding="utf-8")

        written = []
        for name in GENERATED_FILES:
            src = Path(tmp) / name
            if not src.is_file():
                raise RuntimeError(f"protoc did not produce {name}")
            dst = out_dir / name
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PB_DIR, help="output directory")
    parser.add_argument("--proto", type=Path, default=PROTO_FILE, help="proto file")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.proto):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
