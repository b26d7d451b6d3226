"""Each documented precondition fires, naming the operator, the argument and the rule's source."""

from __future__ import annotations

import pytest
import torch
from npu_dense import Paged

F16, BF16 = torch.float16, torch.bfloat16


def _decode_args(dtype=F16, block_size=16, head_dim=64, lens=(5, 20), heads=4, kv_heads=2):
    paged = Paged(list(lens), block_size, kv_heads, head_dim, dtype)
    query = torch.randn(len(lens), heads, head_dim).to(dtype)
    return dict(query=query, key_cache=paged.key_cache, value_cache=paged.value_cache,
                num_kv_heads=kv_heads, num_heads=heads, scale_value=0.125,
                block_table=paged.block_table, context_lens=torch.tensor(lens, dtype=torch.int32),
                out=torch.empty_like(query))


def _pa(**args):
    import torch_npu

    torch_npu._npu_paged_attention(**args)


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(RuntimeError, match=match) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    return msg


def test_valid_call_passes(emu):
    _pa(**_decode_args())


def test_wrong_dtype(emu):
    args = _decode_args()
    args["query"] = args["query"].float()
    msg = _raises(r"_npu_paged_attention: query: dtype float32 is not supported", _pa, **args)
    assert "_atb_api_docs.py" in msg


def test_mixed_dtypes(emu):
    args = _decode_args()
    args["value_cache"] = args["value_cache"].to(BF16)
    _raises(r"value_cache: dtype torch.bfloat16 differs from query's torch.float16", _pa, **args)


def test_non_contiguous_cache(emu):
    args = _decode_args()
    kc = args["key_cache"]
    args["key_cache"] = kc.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, ND-strided
    _raises(r"key_cache: must be contiguous", _pa, **args)


def test_int64_block_table(emu):
    args = _decode_args()
    args["block_table"] = args["block_table"].long()
    _raises(r"block_table: dtype torch.int64 must be int32", _pa, **args)


def test_int64_context_lens(emu):
    args = _decode_args()
    args["context_lens"] = args["context_lens"].long()
    _raises(r"context_lens: dtype torch.int64 must be int32", _pa, **args)


def test_block_size_8(emu):
    msg = _raises(r"block_size 8 must be a multiple of 16 \(line 275", _pa,
                  **_decode_args(block_size=8))
    assert "_npu_paged_attention_v2" in msg


def test_block_size_over_128(emu):
    _raises(r"block_size 144 must be <= 128", _pa, **_decode_args(block_size=144))


def test_out_of_pool_block_id(emu):
    args = _decode_args()
    args["block_table"][1, 0] = args["key_cache"].shape[0]
    _raises(r"block_table: holds block id \d+ outside the pool \[0, \d+\)", _pa, **args)


def test_block_table_too_narrow(emu):
    args = _decode_args()
    args["context_lens"] = torch.tensor([5, 100], dtype=torch.int32)
    _raises(r"block_table: has 2 columns but a sequence of 100 tokens needs 7 blocks", _pa, **args)


def test_head_counts_must_match_the_shapes(emu):
    args = _decode_args()
    args["num_heads"] = 8
    _raises(r"num_heads: is 8 but query has 4 heads", _pa, **args)
    args = _decode_args(heads=6, kv_heads=4)
    _raises(r"GQA needs num_heads % num_kv_heads == 0", _pa, **args)


def test_head_dim_limit(emu):
    _raises(r"head_size: 288 outside \(0, 256\]", _pa, **_decode_args(head_dim=288))


def test_out_shape(emu):
    args = _decode_args()
    args["out"] = torch.empty(3, 4, 64, dtype=F16)
    _raises(r"out: shape \(3, 4, 64\) must be \(2, 4, 64\)", _pa, **args)


def test_310p_bf16_and_nd_cache(emu):
    emu.configure(soc="310P")
    _raises(r"bfloat16 is not supported on 310P", _pa, **_decode_args(dtype=BF16))
    _raises(r"310P .* requires FRACTAL_NZ caches", _pa, **_decode_args())


def test_nnal_missing_raises_the_real_oserror_on_every_call(emu):
    import torch_npu

    emu.configure(nnal_missing=True)
    for _ in range(2):
        with pytest.raises(OSError, match="nnal package is installed.*source set_env.sh"):
            torch_npu._npu_paged_attention(**_decode_args())
        with pytest.raises(OSError, match="nnal package"):
            torch_npu.atb._npu_paged_attention_v2(None, None, None, [])  # before any argument check
    x = torch.randn(2, 8)
    torch_npu.npu_rms_norm(x, torch.ones(8))  # aclnn ops do not need NNAL


def test_wrong_keyword_fails_in_the_dispatcher(emu):
    import torch_npu

    args = _decode_args()
    args["num_head"] = args.pop("num_heads")
    with pytest.raises(RuntimeError, match=r"atb::_npu_paged_attention\(\) is missing value for argument 'num_heads'"):
        _pa(**args)
    a = _decode_args()
    with pytest.raises(RuntimeError, match="Unknown keyword argument 'seq_lens'"):
        torch_npu.atb._npu_paged_attention_v2(a["query"], a["key_cache"], a["block_table"], [5, 20],
                                              value_cache=a["value_cache"], seq_lens=[5, 20],
                                              out=a["out"])
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'context_lens'"):
        torch_npu._npu_paged_attention(a["query"], a["key_cache"], a["value_cache"], 2, 4, 0.1,
                                       a["block_table"], [5, 20], a["out"])
    with pytest.raises(RuntimeError, match="missing value for argument .input."):
        torch_npu.npu_rms_norm(self=torch.randn(2, 8), gamma=torch.ones(8))


def _v2(a, **kw):
    import torch_npu

    base = dict(value_cache=a["value_cache"], num_kv_heads=2, num_heads=4, scale_value=0.1,
                out=a["out"])
    base.update(kw)
    return torch_npu.atb._npu_paged_attention_v2(a["query"], a["key_cache"], a["block_table"],
                                                 [5, 20], **base)


def test_paged_v2_mask_rules(emu):
    a = _decode_args()
    _raises(r"mask: required with mask_type=2", _v2, a, mask_type=2)
    _raises(r"mask_type: 1: only 0 \(UNDEFINED\) and 2", _v2, a, mask_type=1,
            mask=torch.zeros(2, 4, 1, 20, dtype=F16))
    _raises(r"mask: shape \(2, 4, 20\) must be \[batch=2, num_heads=4, 1, max_seq_len>=20\]", _v2, a,
            mask_type=2, mask=torch.zeros(2, 4, 20, dtype=F16))
    _raises(r"mask: shape \(2, 4, 1, 10\)", _v2, a, mask_type=2, mask=torch.zeros(2, 4, 1, 10, dtype=F16))
    _raises(r"mask: dtype torch.bfloat16 differs", _v2, a, mask_type=2,
            mask=torch.zeros(2, 4, 1, 20, dtype=BF16))
    _raises(r"num_heads: is 0", _v2, a, num_heads=0)


def _fa(q, k, v, mask, lens, heads=4, kv=2):
    import torch_npu

    torch_npu._npu_flash_attention(q, k, v, mask, torch.tensor(lens, dtype=torch.int32), 0.125,
                                   heads, kv, torch.empty_like(q))


def _qkv(t, dtype=F16, heads=4, kv=2, d=64):
    return (torch.randn(t, heads, d).to(dtype), torch.randn(t, kv, d).to(dtype),
            torch.randn(t, kv, d).to(dtype))


def test_flash_attention_mask_shape_and_values(emu):
    q, k, v = _qkv(12)
    upper = torch.ones(8, 8, dtype=torch.bool).triu(1)
    good16 = torch.zeros(8, 8).masked_fill(upper, -10000).half()
    _fa(q, k, v, good16, [8, 4])
    _raises(r"mask: shape \(6, 6\) must be \[max_seq_len, max_seq_len\]", _fa, q, k, v, good16[:6, :6].contiguous(),
            [8, 4])
    _raises(r"mask: shape \(3, 8, 8\)", _fa, q, k, v, good16.expand(3, 8, 8).contiguous(), [8, 4])
    flags16 = upper.half()  # the bf16 convention passed with fp16
    _raises(r"fp16 NORM mask is additive", _fa, q, k, v, flags16, [8, 4])
    qb, kb, vb = (t.to(BF16) for t in (q, k, v))
    _fa(qb, kb, vb, upper.to(BF16), [8, 4])
    _raises(r"bf16 or the high-precision kernel a NORM mask holds 0 \(keep\) or 1", _fa, qb, kb, vb,
            torch.zeros(8, 8).masked_fill(upper, float("-inf")).to(BF16), [8, 4])


def test_flash_attention_lengths(emu):
    q, k, v = _qkv(12)
    mask = torch.zeros(8, 8).half()
    _raises(r"seq_len: sums to 11 but the query has 12 tokens", _fa, q, k, v, mask, [8, 3])
    _raises(r"seq_len: entry 1 is 0", _fa, q, k, v, mask, [12, 0])


def _fa2(q, k, v, lens, **kw):
    import torch_npu

    base = dict(scale_value=0.125, num_heads=q.shape[1], num_kv_heads=k.shape[1],
                out=torch.empty_like(q))
    base.update(kw)
    return torch_npu.atb._npu_flash_attention_v2(q, k, v, lens, **base)


def test_flash_attention_v2_alibi_mask_shape(emu):
    q, k, v = _qkv(12)
    _fa2(q, k, v, [8, 4], mask=torch.zeros(2, 4, 8, 8).half(), mask_type=2)
    _raises(r"mask_type=2 \(ALiBi\) documents only \[batch=2, head_num=4", _fa2, q, k, v, [8, 4],
            mask=torch.zeros(4, 8, 8).half(), mask_type=2)
    _raises(r"mask: shape \(2, 4, 7, 7\)", _fa2, q, k, v, [8, 4], mask=torch.zeros(2, 4, 7, 7).half(),
            mask_type=2)


def test_flash_attention_v2_compressed_alibi_rules(emu):
    q, k, v = _qkv(12)
    i = torch.arange(256)
    mask = ((i[:, None] - i[None, :]).float() + 60000 * torch.ones(256, 256).triu(1)).half()
    slopes = -torch.rand(4) - 0.01
    _fa2(q, k, v, [8, 4], mask=mask, slopes=slopes, kernel_type=1, mask_type=4)
    _raises(r"fp16 with a compressed ALiBi mask needs kernel_type=1", _fa2, q, k, v, [8, 4],
            mask=mask, slopes=slopes, kernel_type=0, mask_type=4)
    _raises(r"slopes: must be float32 \[num_heads=4\]", _fa2, q, k, v, [8, 4], mask=mask,
            slopes=slopes.half(), kernel_type=1, mask_type=4)
    _raises(r"negated ALiBi slopes", _fa2, q, k, v, [8, 4], mask=mask, slopes=-slopes,
            kernel_type=1, mask_type=4)
    _raises(r"must hold i - j", _fa2, q, k, v, [8, 4], mask=mask.t().contiguous(), slopes=slopes,
            kernel_type=1, mask_type=4)
    q2, k2, v2 = _qkv(12, d=256)
    _raises(r"head_size: 256 > 128 with a compressed", _fa2, q2, k2, v2, [8, 4], mask=mask,
            slopes=slopes, kernel_type=1, mask_type=4)
    _raises(r"mask_type: 5 \(ALiBi compress sqrt / left align\) is not emulated", _fa2, q, k, v,
            [8, 4], mask=mask, slopes=slopes, kernel_type=1, mask_type=5)


def _prefix(paged, query, q_lens, kv_lens, **kw):
    import torch_npu

    base = dict(num_kv_heads=paged.key_cache.shape[2], num_heads=query.shape[1],
                scale_value=0.125, out=torch.empty_like(query))
    base.update(kw)
    mask = base.pop("mask", torch.ones(128, 128).triu(1).to(query.dtype))
    return torch_npu.atb._npu_flash_attention_prefix_v2(
        query, paged.key_cache, paged.value_cache, paged.block_table, mask, q_lens, kv_lens, **base)


def test_prefix_v2_rules(emu):
    paged = Paged([128 + 4], 128, 2, 64, F16)
    query = torch.randn(4, 4, 64).half()
    _prefix(paged, query, [4], [132])
    _raises(r"prefix = context_lens - seq_len = 132 - 2 must be >= 0 and a multiple of 128",
            _prefix, paged, query[:2], [2], [132])
    _raises(r"kernel_type: 0: only 1", _prefix, paged, query, [4], [132], kernel_type=0)
    _raises(r"mask_type=3 \(NORM_COMPRESS\) with the high-precision kernel", _prefix, paged, query,
            [4], [132], mask=torch.zeros(128, 128).masked_fill(
                torch.ones(128, 128, dtype=torch.bool).triu(1), -10000).half())
    small = Paged([64 + 4], 64, 2, 64, F16)
    _raises(r"block_size\): 64: blockSize must be 128", _prefix, small, query, [4], [68])


def test_splitfuse_rules(emu):
    import torch_npu

    paged = Paged([20, 9], 16, 2, 64, F16)
    query = torch.randn(4, 4, 64).half()
    mask = torch.zeros(4, 20).half()
    call = lambda m, q_lens, kv_lens: torch_npu._npu_paged_attention_splitfuse(  # noqa: E731
        query, paged.key_cache, paged.value_cache, paged.block_table,
        torch.tensor(kv_lens, dtype=torch.int32), m, torch.tensor(q_lens, dtype=torch.int32),
        2, 4, 0.125, torch.empty_like(query))
    call(mask, [3, 1], [20, 9])
    _raises(r"mask: shape \(4, 19\) must be \[num_tokens=4, max_seq_len>=20\]", call, mask[:, :19].contiguous(),
            [3, 1], [20, 9])
    _raises(r"holds values other than 0 \(keep\) and <= -10000", call, mask + 1, [3, 1], [20, 9])
    _raises(r"seq_len: sums to 3 but the query has 4 tokens", call, mask, [2, 1], [20, 9])


def test_reshape_and_cache_rules(emu):
    import torch_npu

    kc, vc = torch.zeros(4, 16, 2, 64).half(), torch.zeros(4, 16, 2, 64).half()
    key, value = torch.randn(3, 2, 64).half(), torch.randn(3, 2, 64).half()
    call = lambda slots, **kw: torch_npu._npu_reshape_and_cache(  # noqa: E731
        kw.get("key", key), value, kw.get("kc", kc), vc, slots)
    call(torch.tensor([0, 5, 63], dtype=torch.int32))
    _raises(r"slot 5 appears more than once", call, torch.tensor([5, 5, 1], dtype=torch.int32))
    _raises(r"slot 64 is outside the pool of 4 blocks x 16 = 64 slots", call,
            torch.tensor([0, 1, 64], dtype=torch.int32))
    _raises(r"slot_indices: dtype torch.int64 must be int32", call, torch.tensor([0, 1, 2]))
    _raises(r"key: dtype float32 is not supported", call, torch.tensor([0, 1, 2], dtype=torch.int32),
            key=key.float())
    _raises(r"key_cache: must be contiguous", call, torch.tensor([0, 1, 2], dtype=torch.int32),
            kc=torch.zeros(4, 2, 16, 64).half().transpose(1, 2))


def test_norm_and_rotary_rules(emu):
    import torch_npu

    _raises(r"npu_rms_norm: gamma: dtype torch.float32 must equal the input's torch.float16",
            torch_npu.npu_rms_norm, torch.randn(2, 8).half(), torch.ones(8))
    _raises(r"gamma: shape \(4,\) must equal the trailing dims", torch_npu.npu_rms_norm,
            torch.randn(2, 8), torch.ones(4))
    _raises(r"npu_rotary_mul: r1/r2: shapes", torch_npu.npu_rotary_mul, torch.randn(1, 5, 2, 8),
            torch.rand(1, 4, 1, 8), torch.rand(1, 4, 1, 8))
    _raises(r"D = 7: must be even", torch_npu.npu_rotary_mul, torch.randn(1, 5, 2, 7),
            torch.rand(1, 5, 1, 7), torch.rand(1, 5, 1, 7))
    emu.configure(soc="310P")
    _raises(r"bfloat16 is not supported on 310P", torch_npu.npu_add_rms_norm,
            torch.randn(2, 8).to(BF16), torch.randn(2, 8).to(BF16), torch.ones(8).to(BF16))


def test_every_message_cites_a_source(emu):
    args = _decode_args()
    args["block_table"] = args["block_table"].long()
    msg = _raises("block_table", _pa, **args)
    assert msg.startswith("_npu_paged_attention: block_table: ") and msg.endswith("]")
    assert "torch_npu 2.13.0" in msg and "line" in msg
