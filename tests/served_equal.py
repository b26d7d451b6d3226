"""How close a request served in a batch must be to the same request served alone.

In float32 the shard's CPU kernels give the same tokens and logprobs within 1e-4 whatever the
batch. In 16-bit arithmetic they need not: a matmul's result may depend on how many rows it has.
Measured on a machine with AVX512-FP16 and AMX (oneDNN's 16-bit kernels): a float16 ``F.linear``
of one row differs from the same row in a two-row product by up to 2e-3 at ``[1024] x [3072,
1024]``, and packed bfloat16 linears differ by 5e-4 between 17 and 40 rows; an NPU's matrix unit
tiles by rows too. Through a model that moves logprobs by ~1e-3 (3.2e-3 in float16, 3.5e-4 in
bfloat16 seen), and it can reorder tokens tied at the edge of a fuzzy top-n list. Tokens and texts
must still match exactly: the tests' models are built so that greedy choices are not near-ties.
A float32 model is in 16-bit arithmetic too where a kernel is (W8A16 on the CPU takes bfloat16
activations).
"""

from __future__ import annotations

FLOAT32_TOLERANCE = 1e-4
HALF_TOLERANCE = 1e-2  # 16-bit activations: a few ulps of bfloat16 (2^-8) at logprobs of ~1


def logprob_tolerance(dtype: str) -> float:
    """The tolerance for a shard whose ``Info.dtype`` is ``dtype`` (e.g. ``torch.bfloat16``)."""
    return HALF_TOLERANCE if dtype in ("torch.float16", "torch.bfloat16") else FLOAT32_TOLERANCE


def same_top_tokens(x_ids, x_logprobs, y_ids, y_logprobs, tol: float) -> None:
    """Per generated token, two top-n lists: equal in float32; in 16-bit, the same best token,
    logprobs within ``tol`` for tokens both lists hold, and a token only one list holds within
    ``tol`` of the other list's last (a tie at the edge that rounding decided differently)."""
    assert len(x_ids) == len(y_ids)
    if tol <= FLOAT32_TOLERANCE:
        assert x_ids == y_ids
        return
    for xi, xl, yi, yl in zip(x_ids, x_logprobs, y_ids, y_logprobs):
        assert xi[:1] == yi[:1]
        xs, ys = dict(zip(xi, xl)), dict(zip(yi, yl))
        for token in xs.keys() & ys.keys():
            assert abs(xs[token] - ys[token]) < tol
        for token in xs.keys() - ys.keys():
            assert abs(xs[token] - min(yl)) < tol
        for token in ys.keys() - xs.keys():
            assert abs(ys[token] - min(xl)) < tol
