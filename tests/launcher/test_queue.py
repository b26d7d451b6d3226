"""``Queue.next_batch``: budgets, min/max size and block bookkeeping (TGI ``queue.rs`` rules)."""

from __future__ import annotations

from tgi_npu_backend.launcher.allocator import BlockAllocator
from tgi_npu_backend.launcher.batch_queue import Entry, Queue
from tgi_npu_backend.launcher.entities import ValidParameters, ValidRequest, ValidStopping
from tgi_npu_backend.launcher.metrics import Metrics


def request(input_length: int, max_new_tokens: int = 4) -> ValidRequest:
    return ValidRequest(
        inputs="x",
        input_length=input_length,
        truncate=input_length,
        add_special_tokens=True,
        decoder_input_details=False,
        top_n_tokens=0,
        parameters=ValidParameters(),
        stopping=ValidStopping(max_new_tokens=max_new_tokens),
    )


def make_queue(total_tokens: int = 16 * 64) -> Queue:
    return Queue(
        allocator=BlockAllocator(total_tokens, 16), block_size=16, speculate=0, metrics=Metrics()
    )


def fill(queue: Queue, *lengths: int) -> list[Entry]:
    entries = [Entry(request=request(n)) for n in lengths]
    for e in entries:
        queue.append(e)
    return entries


def test_prefill_budget_is_rounded_up_to_blocks_and_fifo_is_kept():
    q = make_queue()
    fill(q, 10, 10, 10)
    nb = q.next_batch(None, None, prefill_token_budget=17, token_budget=10_000)  # rounded to 32
    assert [r.id for r in nb.batch.requests] == [0, 1, 2][: len(nb.batch.requests)]
    assert len(nb.batch.requests) == 3 and nb.batch.max_tokens == 30
    assert nb.batch.max_blocks == 1 and nb.batch.id == 0
    assert len(q) == 0


def test_over_budget_entry_goes_back_with_its_blocks_freed():
    q = make_queue()
    fill(q, 20, 20)
    free = q.allocator.free_blocks
    nb = q.next_batch(None, None, prefill_token_budget=32, token_budget=10_000)
    assert len(nb.batch.requests) == 1 and len(q) == 1
    assert q.allocator.free_blocks == free - 2  # only the admitted request holds blocks
    nb2 = q.next_batch(None, None, 32, 10_000)
    assert nb2.batch.id == 1 and nb2.batch.requests[0].id == 1


def test_min_size_returns_everything_to_the_queue():
    q = make_queue()
    fill(q, 5, 5)
    free = q.allocator.free_blocks
    assert q.next_batch(3, None, 1000, 10_000) is None  # fewer entries than min_size
    assert q.next_batch(2, 1, 1000, 10_000) is None  # max_size 1 < min_size 2: put back
    assert len(q) == 2 and q.allocator.free_blocks == free
    assert q.next_batch(None, 0, 1000, 10_000) is None  # no room in the running batch
    nb = q.next_batch(2, None, 1000, 10_000)
    assert [r.id for r in nb.batch.requests] == [0, 1]


def test_cancelled_entries_are_dropped_and_pool_exhaustion_waits():
    q = make_queue(total_tokens=16 * 3)  # 2 usable blocks
    a, b, c = fill(q, 10, 20, 10)
    a.cancelled = True
    nb = q.next_batch(None, None, 1000, 10_000)
    assert [r.id for r in nb.batch.requests] == [b.id]  # b takes both blocks, c must wait
    assert len(q) == 1 and q.metrics.counter_value("tgi_request_failure", err="dropped") == 1
    q.free(b)
    assert q.next_batch(None, None, 1000, 10_000).batch.requests[0].id == c.id


def test_padded_model_budget_counts_padding():
    q = Queue(allocator=None, block_size=1, speculate=0, metrics=Metrics())
    fill(q, 10, 30, 5)
    nb = q.next_batch(None, None, prefill_token_budget=60, token_budget=1000)
    # 2 x 30 = 60 fits; a third would be 3 x 30 = 90 prefill tokens
    assert len(nb.batch.requests) == 2 and not nb.batch.requests[0].slots


def test_radix_queue_sends_cache_len_and_lowers_a_whole_prompt_match_by_one():
    from dataclasses import replace

    from tgi_npu_backend.launcher.radix import RadixAllocator

    q = Queue(allocator=RadixAllocator(16 * 64, 16), block_size=16, speculate=0, metrics=Metrics())
    system = list(range(1000, 1032))  # two full blocks

    def entry(ids: list[int], details: bool = False) -> Entry:
        r = replace(request(len(ids)), input_ids=None if details else tuple(ids),
                    decoder_input_details=details)
        e = Entry(request=r)
        q.append(e)
        return e

    first = entry(system + [1, 2, 3])
    nb = q.next_batch(None, None, 10_000, 10_000)
    assert nb.batch.requests[0].cache_len == 0
    first_blocks = list(first.allocation.blocks)
    q.free(first)  # finished: its two prompt blocks are now cached
    hit, repeat, details = entry(system + [4, 5]), entry(system), entry(system + [4, 5], True)
    over = entry(system + [9])
    nb = q.next_batch(None, None, prefill_token_budget=16, token_budget=10_000)
    reqs = nb.batch.requests
    # the prefill budget counts only uncached tokens: 2 + 1 fit in 16, the details request
    # (no token ids: no reuse, 34 tokens) does not
    assert [r.cache_len for r in reqs] == [32, 31] and nb.batch.max_tokens == 3
    assert list(reqs[0].blocks[:2]) == list(reqs[1].blocks[:2]) == first_blocks[:2]
    assert [e.id for e in q.entries] == [details.id, over.id]
    for e in (hit, repeat):
        q.free(e)
    q.entries.clear()
    alloc = q.allocator
    assert alloc.free_blocks + alloc.cached_blocks == alloc.capacity
