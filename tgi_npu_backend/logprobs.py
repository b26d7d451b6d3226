"""The chooser's reductions over the vocabulary, and what leaves a step of them: ``argmax`` (the
first maximum) and ``log_softmax`` of every row at once (``greedy``; one native call on float32
CPU scores, ``device_kernels/cpu_sample.c``), the chosen tokens' ids and logprobs as
host lists (``chosen_to_host``, the step's device -> host copy), and TGI's fuzzy top-n
(``top_n_tokens``). ``sampling.TokenChooser`` produces the scores and logprobs they read.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .kernels.cpu_native import greedy_kernel
from .warpers import NEG_INF


def greedy(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``argmax(scores)`` and ``log_softmax(scores)``. On contiguous float32 CPU scores in one call
    of the native kernel (``device_kernels/cpu_sample.c``: 3x faster than the two on one row of a
    250,880-token vocabulary, 1.6x on 32; a row's results are the same bits in any batch and with
    any number of threads); elsewhere, and for rows with a NaN, +inf or only -inf, these two ops.
    The chooser's two paths both take it, so a greedy row gets the same bits on either."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.is_contiguous():
        kernel = greedy_kernel()
        picked = None if kernel is None else kernel(scores)
        if picked is not None:
            return picked
    return argmax(scores), torch.log_softmax(scores, dim=-1)


def argmax(scores: Tensor) -> Tensor:
    """``scores.argmax(-1)``: the first maximum of each row (a NaN counts as the maximum).

    NOTE: on the CPU numpy's ``argmax`` does this far faster than torch's reductions with an index,
    which do not vectorise over a row: measured single-threaded on float32 ``[32, 512]`` 3.5 us
    against 49 us for ``max(dim).indices`` and 76 us for ``argmax``, and on ``[32, 250880]`` 3.4
    against 18.9 ms. Elsewhere ``max(dim)``: the same index as ``argmax``, documented so."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        return torch.from_numpy(scores.detach().numpy().argmax(-1))
    return scores.max(dim=-1).indices


def chosen_to_host(logprobs: Tensor, next_ids: Tensor) -> tuple[list[int], list[float]]:
    """The chosen ids and the logprob of each, as host lists: the step's device -> host copy.

    NOTE: on the CPU, numpy's fancy indexing of the two arrays, after ``argmax`` has used numpy,
    instead of ``gather`` + ``squeeze`` and two tensor ``tolist`` calls: a handful of torch
    operations that each cost tens of microseconds right after a forward pass has evicted the
    host code from the CPU caches (benchmarks/bench_host.py). Same float32 values."""
    if logprobs.device.type == "cpu" and logprobs.dtype == torch.float32:
        ids = next_ids.numpy()
        return ids.tolist(), logprobs.numpy()[np.arange(len(ids)), ids].tolist()
    picked = logprobs.gather(1, next_ids[:, None]).squeeze(1)
    return next_ids.tolist(), picked.tolist()


def top_n_tokens(logprobs: Tensor, top_n: list[int]) -> list[tuple[list[int], list[float]]]:
    """TGI's ``batch_top_tokens``: per row the ``n`` most likely tokens plus every token tied
    with the n-th ("fuzzy" top-n, so more than ``n`` can come back), by descending logprob
    (ties by ascending token id); rows with ``n == 0`` get empty lists.

    ``logprobs``: ``[B, V]``; ``top_n``: ``B`` requested counts.
    """
    batch, vocab = logprobs.shape
    if len(top_n) != batch:
        raise ValueError(f"top_n has {len(top_n)} entries for a batch of {batch} rows")
    if max(top_n, default=0) <= 0:
        return [([], []) for _ in range(batch)]
    n = torch.tensor([min(max(x, 0), vocab) for x in top_n], device=logprobs.device)  # [B]
    sorted_top = torch.topk(logprobs, k=int(n.max()), dim=-1).values  # [B, n_max]
    nth = sorted_top.gather(1, (n - 1).clamp(min=0).unsqueeze(1))  # [B, 1]
    # NOTE: TGI: a -inf n-th value would admit every -inf token; use the lowest finite instead.
    nth = nth.masked_fill(nth == NEG_INF, torch.finfo(logprobs.dtype).min)
    counts = (logprobs >= nth).sum(dim=1).masked_fill(n == 0, 0)  # [B]
    k = max(int(counts.max()), 1)
    top = torch.topk(logprobs, k=k, dim=-1)  # [B, k]
    # topk does not order ties: order by token id, then stably by descending value.
    by_id, perm = top.indices.sort(dim=-1)
    order = top.values.gather(1, perm).sort(dim=-1, descending=True, stable=True).indices
    ids = by_id.gather(1, order).tolist()
    values = top.values.gather(1, perm).gather(1, order).tolist()
    return [(ids[i][:c], values[i][:c]) for i, c in enumerate(counts.tolist())]
