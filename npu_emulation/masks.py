"""How each attention operator reads its mask, as established from the public sources.

* NORM masks (``_npu_flash_attention``; ``_npu_flash_attention_v2`` mask_type=1): two value
  conventions. fp16 on the default kernel: additive, 0 = keep, a large negative value = masked
  (op-plugin test_atb_flash_attention.py builds ``triu(ones) * -10000``; vllm-ascend v0.7.3
  attention.py ``generate_attn_mask`` uses float32-min, i.e. -inf once cast). bf16, or any dtype
  with the high-precision kernel: a 0/1 flag, 1 = masked (vllm-ascend v0.7.3 passes 1 for bf16;
  the CANN ATB SelfAttentionOperation reference: "当开启高精度功能且maskType为NORM或NORM_COMPRESS时,
  mask值需传1"; op-plugin test_atb_flash_attention_v2.py multiplies a 0/1 mask by -3e38 for
  bf16). The emulation refuses any other value, so a mask built with the wrong convention fails.
* ALiBi masks (``_npu_flash_attention_v2`` mask_type=2, ``_npu_paged_attention_v2`` mask_type=2):
  additive in both dtypes; the kernel adds ``mask[b, h, :q_len, :kv_len]`` after the scale (golden
  of op-plugin's ``test_flash_attention_case_fa_encoder_nocache_bf16_alibi`` and
  ``test_paged_attention_v2``); masked entries there are -10000 (fp16) / -inf (bf16).
* Splitfuse masks (``_npu_paged_attention_splitfuse``): additive, one row per query token, column =
  absolute key position (op-plugin test_atb_paged_attention_splitfuse.py ``make_attention_mask``:
  0 / -10000; vllm-ascend v0.7.3 ``get_splitfuse_attn_mask``: -10000, or -inf for fp16).
* Compressed ALiBi, mask_type=4 with a [256, 256] mask and ``slopes``: the only construction the
  public sources show (op-plugin test_atb_flash_attention_v2.py, ``..._bf16_alibi_compress``) is
  ``mask[i][j] = i - j`` on and below the diagonal, a large positive value above it, and slopes
  passed negated, for which the kernel's result equals causal ALiBi ``slope * (j - i)`` over the
  whole sequence (1024 tokens there, beyond the 256 of the mask). How the kernel extends any other
  [256, 256] mask past 256 is not documented, so the emulation accepts only that construction
  (confirm on a device). The [head_num, seq_len, 128] variant and mask_type 5/6 are not emulated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contracts import fail

MASKED_AT_MOST = -10000.0  # the least negative value any public source uses for "masked"


def _as_stored(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to the mask's dtype (-10000 is -9984 in bfloat16)."""
    return float(torch.tensor(value).to(dtype))


def norm_mask(op: str, name: str, mask: Tensor, flag: bool, source: str) -> tuple[Tensor | None, Tensor | None]:
    """Validate a NORM mask's values; return (additive bias, visible) in float64/bool."""
    m = mask.to(torch.float64)
    if flag:
        if not bool(((m == 0) | (m == 1)).all()):
            fail(op, name, "with bf16 or the high-precision kernel a NORM mask holds 0 (keep) or 1 "
                 "(masked) only (ATB SelfAttention: high precision + MASK_TYPE_NORM -> mask value 1; "
                 "vllm-ascend v0.7.3 generate_attn_mask)", source)
        return None, m == 0
    if not bool(((m == 0) | (m <= _as_stored(MASKED_AT_MOST, mask.dtype))).all()):
        fail(op, name, f"an fp16 NORM mask is additive and holds 0 (keep) or <= {MASKED_AT_MOST} "
             "(masked, -inf allowed); a 1 here is the bf16 flag convention (op-plugin "
             "test_atb_flash_attention.py: -10000; vllm-ascend v0.7.3: float32 min)", source)
    return m, None


def additive_mask_values(op: str, name: str, mask: Tensor, source: str,
                         masked_only: bool = False) -> None:
    m = mask.to(torch.float64)
    if bool(torch.isnan(m).any()) or bool((m == float("inf")).any()):
        fail(op, name, "holds NaN or +inf: the kernel adds the mask to the scores", source)
    if masked_only and not bool(((m == 0) | (m <= _as_stored(MASKED_AT_MOST, mask.dtype))).all()):
        fail(op, name, f"holds values other than 0 (keep) and <= {MASKED_AT_MOST} (masked); a 1 "
             "here is the bf16 flag convention of _npu_flash_attention, which this op does not "
             "use (vllm-ascend v0.7.3 scales it by -10000 for splitfuse)", source)


def alibi_compress_256(op: str, mask: Tensor, slopes: Tensor | None, heads: int,
                       source: str) -> Tensor:
    """Validate the [256, 256] compressed ALiBi construction; return per-head slopes (float64)."""
    if tuple(mask.shape) != (256, 256):
        fail(op, "mask", f"shape {tuple(mask.shape)}: the emulation models only the [256, 256] "
             "compressed ALiBi mask (the [head_num, seq_len, 128] form is not emulated)", source)
    m = mask.to(torch.float64)
    i = torch.arange(256)
    lower = i[None, :] <= i[:, None]
    dist = (i[:, None] - i[None, :]).to(torch.float64)
    if not bool((m[lower] == dist[lower]).all()):
        fail(op, "mask", "on and below the diagonal the [256, 256] compressed ALiBi mask must hold "
             "i - j (the construction of op-plugin test_atb_flash_attention_v2.py "
             "_bf16_alibi_compress; other constructions are not documented: confirm on a device)",
             source)
    if not bool((m[~lower] >= _as_stored(-MASKED_AT_MOST, mask.dtype)).all()):
        fail(op, "mask", "above the diagonal the compressed ALiBi mask must hold a large positive "
             f"value (>= {-MASKED_AT_MOST}; op-plugin uses 60000 or +inf), which the negative "
             "slopes turn into a masked score", source)
    if slopes is None:
        fail(op, "slopes", "required with a compressed ALiBi mask (mask_type 4)", source)
    if slopes.dtype != torch.float32 or tuple(slopes.shape) != (heads,):
        fail(op, "slopes", f"must be float32 [num_heads={heads}] (got {slopes.dtype} "
             f"{tuple(slopes.shape)}; _atb_api_docs.py line 346 says [batch], line 425 and the ATB "
             "SelfAttention reference say [head]: one coefficient per head)", source)
    if not bool((slopes < 0).all()):
        fail(op, "slopes", "must be the negated ALiBi slopes (all < 0) for the i - j compressed "
             "mask (op-plugin test_atb_flash_attention_v2.py: alibi_slopes *= -1)", source)
    return slopes.to(torch.float64)
