"""``Weights``: strict, shard-aware safetensors reading (no model involved)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tgi_npu_backend.distributed import ParallelContext
from tgi_npu_backend.weights import Weights


@pytest.fixture
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "transformer.a.weight": torch.randn(4, 6, generator=g),
            "transformer.b.weight": torch.randn(6, generator=g, dtype=torch.float64),
            "transformer.ids": torch.arange(5, dtype=torch.int32),
        },
        str(tmp_path / "model-00001-of-00002.safetensors"),
    )
    save_file(
        {"lm_head.weight": torch.randn(8, 6, generator=g)},
        str(tmp_path / "model-00002-of-00002.safetensors"),
    )
    return tmp_path


def weights(path, rank=0, world_size=1, **kw) -> Weights:
    return Weights(path, dtype=torch.bfloat16, parallel=ParallelContext(rank, world_size), **kw)


def test_floats_are_cast_integers_kept(ckpt):
    w = weights(ckpt)
    assert w.get("transformer.a.weight").dtype == torch.bfloat16
    assert w.get("transformer.b.weight").dtype == torch.bfloat16
    ids = w.get("transformer.ids")
    assert ids.dtype == torch.int32 and ids.tolist() == [0, 1, 2, 3, 4]


class NoFullReads:
    """A safe_open handle that refuses whole-tensor reads."""

    def __init__(self, handle):
        self.handle = handle

    def get_slice(self, name):
        return self.handle.get_slice(name)

    def get_tensor(self, name):
        raise AssertionError(f"read the whole of {name}")


@pytest.mark.parametrize("dim", [0, 1])
def test_each_rank_reads_only_its_slice(ckpt, dim):
    full = weights(ckpt).get("transformer.a.weight")
    parts = []
    for rank in range(2):
        w = weights(ckpt, rank, 2)
        w._handles = {p: NoFullReads(w._handle(n)) for n, p in w._files.items()}
        parts.append(w.get_sharded("transformer.a.weight", dim, shape=(4, 6)))
        assert parts[-1].shape == ((2, 6) if dim == 0 else (4, 3))
    assert torch.equal(torch.cat(parts, dim), full)


def test_replicated_shard(ckpt):
    # One KV head of 2 rows (head_dim 2) replicated: blocks of 2 rows, every rank names its block.
    w = weights(ckpt, rank=3, world_size=4)
    block = w.get_shard("transformer.a.weight", 0, index=1, count=2)
    assert torch.equal(block, weights(ckpt).get("transformer.a.weight")[2:4])


def test_indivisible_shard_names_tensor_dim_and_world(ckpt):
    w = weights(ckpt, rank=0, world_size=3)
    with pytest.raises(
        ValueError, match=r"dim 0 of tensor 'transformer.a.weight' = 4 is not divisible.*world size 3"
    ):
        w.get_sharded("transformer.a.weight", 0)


def test_shape_mismatch_names_expected_and_found(ckpt):
    with pytest.raises(
        ValueError, match=r"'transformer.a.weight' has shape \[4, 6\].*expects \[4, 7\]"
    ):
        weights(ckpt).get("transformer.a.weight", shape=(4, 7))


def test_resolver_aliases_and_missing_names(ckpt):
    w = weights(ckpt, resolver=lambda n: (n, f"transformer.{n}"))
    assert w.has("a.weight") and not w.has("c.weight")
    assert w.get("a.weight").shape == (4, 6)
    with pytest.raises(
        ValueError, match=r"missing tensor 'c.weight'.*looked for: c.weight, transformer.c.weight"
    ):
        w.get("c.weight")


def test_check_all_used_lists_unread_tensors(ckpt):
    w = weights(ckpt)
    w.get("transformer.a.weight")
    assert w.shape("lm_head.weight") == (8, 6)  # header only: not a use
    with pytest.raises(ValueError, match=r"lm_head.weight, transformer.b.weight, transformer.ids"):
        w.check_all_used()
    w.mark_used("lm_head.weight")
    w.check_all_used(allowed_unused={"transformer.b.*", "transformer.ids"})


def test_index_file_is_authoritative(ckpt):
    # The index names only the first file: tensors of the second are not part of the checkpoint.
    index = {
        "weight_map": dict.fromkeys(
            ("transformer.a.weight", "transformer.b.weight", "transformer.ids"),
            "model-00001-of-00002.safetensors",
        )
    }
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not weights(ckpt).has("lm_head.weight")
    index["weight_map"]["x"] = "model-00003-of-00003.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00003-of-00003.safetensors, which is missing"):
        weights(ckpt)


def test_duplicate_and_absent_tensors_are_refused(ckpt, tmp_path_factory):
    save_file({"lm_head.weight": torch.zeros(1)}, str(ckpt / "extra.safetensors"))
    with pytest.raises(ValueError, match="'lm_head.weight' is in both"):
        weights(ckpt)
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        weights(tmp_path_factory.mktemp("empty"))
