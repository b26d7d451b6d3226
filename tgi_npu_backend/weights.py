"""``Weights``: strict, shard-aware reading of a directory of ``*.safetensors`` files.

Every read is recorded so that ``check_all_used`` can refuse a checkpoint with tensors the model
did not consume (a sign of a wrong architecture or naming). Sharded reads go through
``safe_open(...).get_slice`` so a tensor-parallel rank never materialises the full tensor.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from tgi_npu_backend.distributed import ParallelContext, shard_size

INDEX_FILE = "model.safetensors.index.json"

# Maps the name a model asks for to the on-disk names to try, in order (e.g. with and without
# BLOOM's "transformer." prefix).
NameResolver = Callable[[str], Iterable[str]]


def _identity(name: str) -> Iterable[str]:
    return (name,)


class Weights:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        parallel: ParallelContext = ParallelContext(),
        resolver: NameResolver | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = torch.device(device)
        self.parallel = parallel
        self.resolver = resolver or _identity
        self._files = _tensor_files(self.model_dir)  # on-disk name -> file
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()  # on-disk names read (or explicitly consumed)

    # ---- names -------------------------------------------------------------------------------
    @property
    def names(self) -> set[str]:
        return set(self._files)

    def _resolve(self, name: str) -> str | None:
        for candidate in self.resolver(name):
            if candidate in self._files:
                return candidate
        return None

    def resolve(self, name: str) -> str:
        """The on-disk name for ``name``; ``ValueError`` naming what was tried when absent."""
        found = self._resolve(name)
        if found is None:
            tried = ", ".join(dict.fromkeys(self.resolver(name)))
            raise ValueError(f"missing tensor {name!r} in {self.model_dir} (looked for: {tried})")
        return found

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header; reads no data and does not mark the tensor used."""
        disk = self.resolve(name)
        return tuple(self._handle(disk).get_slice(disk).get_shape())

    def mark_used(self, name: str) -> None:
        """Record ``name`` as consumed without reading it (e.g. a tied ``lm_head.weight``)."""
        self.used.add(self.resolve(name))

    # ---- reads -------------------------------------------------------------------------------
    def get(
        self, name: str, shape: Sequence[int] | None = None, *, keep_dtype: bool = False
    ) -> Tensor:
        """The full tensor, floating types cast to the model dtype (unless ``keep_dtype``: e.g.
        float32 quantization scales), on the model device."""
        disk = self.resolve(name)
        self._check_shape(name, disk, shape)
        tensor = self._handle(disk).get_tensor(disk)
        return self._finish(disk, tensor, keep_dtype)

    def get_sharded(self, name: str, dim: int, shape: Sequence[int] | None = None) -> Tensor:
        """This rank's equal share of ``dim`` (``shape`` is the expected *full* shape)."""
        return self.get_shard(name, dim, self.parallel.rank, self.parallel.world_size, shape)

    def get_shard(
        self,
        name: str,
        dim: int,
        index: int,
        count: int,
        shape: Sequence[int] | None = None,
        *,
        keep_dtype: bool = False,
    ) -> Tensor:
        """Block ``index`` of ``count`` equal blocks along ``dim``; only that block is read."""
        disk = self.resolve(name)
        full = self._check_shape(name, disk, shape)
        block = shard_size(full[dim], count, f"dim {dim} of tensor {name!r}")
        return self.get_range(name, dim, index * block, (index + 1) * block, keep_dtype=keep_dtype)

    def get_range(
        self, name: str, dim: int, start: int, stop: int, *, keep_dtype: bool = False
    ) -> Tensor:
        """Rows ``start:stop`` of ``dim`` (read through ``get_slice``: only those rows)."""
        disk = self.resolve(name)
        view = self._handle(disk).get_slice(disk)
        full = tuple(view.get_shape())
        dim = dim % len(full)
        if not 0 <= start <= stop <= full[dim]:
            raise ValueError(f"range {start}:{stop} is outside dim {dim} of {name!r} {full}")
        index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(full)))
        return self._finish(disk, view[index], keep_dtype)

    # ---- strictness --------------------------------------------------------------------------
    def check_all_used(self, allowed_unused: Iterable[str] = ()) -> None:
        """Refuse tensors nobody read; ``allowed_unused``: on-disk names or fnmatch patterns."""
        allowed = list(allowed_unused)
        unused = sorted(
            n
            for n in set(self._files) - self.used
            if not any(n == a or fnmatch.fnmatchcase(n, a) for a in allowed)
        )
        if unused:
            shown = ", ".join(unused[:20]) + (
                f" ... ({len(unused)} in all)" if len(unused) > 20 else ""
            )
            raise ValueError(
                f"unexpected tensors in {self.model_dir} that the model does not use: {shown}. "
                "Is this checkpoint really the architecture config.json names?"
            )

    # ---- internals ---------------------------------------------------------------------------
    def _handle(self, disk: str):
        path = self._files[disk]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def _check_shape(self, name: str, disk: str, shape: Sequence[int] | None) -> tuple[int, ...]:
        found = tuple(self._handle(disk).get_slice(disk).get_shape())
        if shape is not None and tuple(shape) != found:
            raise ValueError(
                f"tensor {name!r} has shape {list(found)} in the checkpoint but the model expects "
                f"{list(shape)}: does config.json match the weights?"
            )
        return found

    def _finish(self, disk: str, tensor: Tensor, keep_dtype: bool = False) -> Tensor:
        self.used.add(disk)
        if tensor.is_floating_point() and not keep_dtype:
            tensor = tensor.to(self.dtype)
        return tensor.to(self.device).contiguous()


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the file holding it (from the index when there is one)."""
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.exists():
                raise ValueError(f"{index} names {path.name}, which is missing")
        return files
    paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    files: dict[str, Path] = {}
    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if name in files:
                    raise ValueError(
                        f"tensor {name!r} is in both {files[name].name} and {path.name}"
                    )
                files[name] = path
    return files
