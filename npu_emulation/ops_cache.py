"""``torch_npu._npu_reshape_and_cache``: write this pass's K/V into their slots of the paged cache."""

from __future__ import annotations

import torch
from torch import Tensor

from . import contracts as c
from .calls import begin, maybe_oom, perturb

OP = "_npu_reshape_and_cache"
SRC = (
    "ATB ReshapeAndCache, ND K_CACHE_V_CACHE (op-plugin test_atb_reshape_and_cache.py; "
    "_atb_api_docs.py _npu_paged_attention_v2 lines 256/263 for the cache layout)"
)


def reshape_and_cache(
    key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_indices: Tensor
) -> None:
    st = begin(OP)
    family = st.settings.family
    c.half_tensors(OP, {"key": key, "value": value, "key_cache": key_cache,
                        "value_cache": value_cache}, family, SRC + "; int8 caches are not emulated")
    c.same_dtype(OP, {"key": key, "value": value, "key_cache": key_cache,
                      "value_cache": value_cache}, SRC)
    c.nz_required(OP, "key_cache", family)
    c.ndim(OP, "key", key, (3,), "[num_tokens, kv_heads, head_size]", SRC)
    c.ndim(OP, "value", value, (3,), "[num_tokens, kv_heads, head_size_v]", SRC)
    nb, bs, kvh, _ = c.paged_cache(OP, "key_cache", key_cache, SRC)
    c.paged_cache(OP, "value_cache", value_cache, SRC)
    if value_cache.shape[:3] != key_cache.shape[:3]:
        c.fail(OP, "value_cache", f"shape {tuple(value_cache.shape)} does not match key_cache "
               f"{tuple(key_cache.shape)} in [num_blocks, block_size, kv_heads]", SRC)
    if tuple(key.shape[1:]) != tuple(key_cache.shape[2:]):
        c.fail(OP, "key", f"shape {tuple(key.shape)} does not fit key_cache "
               f"{tuple(key_cache.shape)} ([num_tokens, kv_heads, head_size])", SRC)
    if tuple(value.shape[1:]) != tuple(value_cache.shape[2:]) or value.shape[0] != key.shape[0]:
        c.fail(OP, "value", f"shape {tuple(value.shape)} does not fit value_cache "
               f"{tuple(value_cache.shape)} / key {tuple(key.shape)}", SRC)
    c.int32(OP, "slot_indices", slot_indices, SRC + "; vllm-ascend passes int32 slots")
    c.ndim(OP, "slot_indices", slot_indices, (1,), "[num_tokens]", SRC)
    if slot_indices.shape[0] != key.shape[0]:
        c.fail(OP, "slot_indices", f"has {slot_indices.shape[0]} slots for {key.shape[0]} tokens",
               SRC)
    slots = slot_indices.to(torch.int64)
    # NOTE: op-plugin's golden (cal_nd) skips negative slots; confirm on a device that the kernel
    # does too. Non-negative slots must lie in the pool and be distinct (two writes to one slot
    # race on the device; npu_scatter_pa_kv_cache documents unique slots).
    keep = slots >= 0
    kept = slots[keep]
    if kept.numel():
        top = int(kept.max())
        if top >= nb * bs:
            c.fail(OP, "slot_indices", f"slot {top} is outside the pool of {nb} blocks x {bs} "
                   f"= {nb * bs} slots", SRC)
        if kept.unique().numel() != kept.numel():
            c.fail(OP, "slot_indices", f"slot {int(torch.bincount(kept).argmax())} appears more "
                   "than once: slots must be unique (a race on the device)", SRC)
    maybe_oom(st, OP)
    flat_k = key_cache.view(nb * bs, kvh, -1)
    flat_v = value_cache.view(nb * bs, kvh, -1)
    flat_k[kept] = key[keep]
    flat_v[kept] = value[keep]
    if OP in st.settings.faults:
        rows_k, rows_v = flat_k[kept], flat_v[kept]
        perturb(st, OP, rows_k, rows_v)
        flat_k[kept], flat_v[kept] = rows_k, rows_v
