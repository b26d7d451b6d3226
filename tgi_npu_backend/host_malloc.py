"""Where the model runs on the CPU, the shard process keeps the memory it frees for reuse (glibc
``mallopt``), instead of handing large blocks back to the kernel and faulting them in again on
the next forward pass.

Why: glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and unmaps it on free. A CPU forward pass allocates such tensors in every layer (BLOOM-560m's
3,328-token prefill: the QKV output ``[3328, 3072]``, the MLP's ``[3328, 4096]``), so each one is
new memory whose 4 KiB pages fault in on first touch, at ~2.6 us a fault on this project's 2-core
VM: 160k-470k page faults in that prefill (``ru_minflt``; some processes got ~100), and 3-131
with these settings. One MLP of it took 444 / 444 / 459 ms with 13,979 faults, and 434 / 395 /
408 ms with none after these settings (fresh processes, alternated).

Two settings, set in two places:

* ``one_arena`` (``M_ARENA_MAX`` 1): every thread allocates from the main heap, which can grow
  past the 64 MiB a thread arena's heap is limited to, so that the generator thread's large
  tensors can come from a heap at all. A thread takes its arena at its first allocation, so
  ``server.serve`` sets this first, before the generator thread exists (the platform is not
  known yet; one arena costs nothing on an NPU host, whose host threads allocate little).
* ``keep_freed_memory`` (mmap and trim thresholds at 1 GiB): blocks up to that size come from
  the heap and stay there when freed. ``Platform.set_device`` sets it where the model runs on
  the CPU, before the model loads. The cost: memory a pass frees stays in the process (its
  resident size stays at its peak, as a GPU caching allocator's does); on an NPU, where the
  activations live on the device, it would only keep the host's load buffers, so it is not set.

On a C library without ``mallopt`` (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

from loguru import logger

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30


def one_arena() -> bool:
    """One malloc arena for every thread; True when glibc took it."""
    return _mallopt(((M_ARENA_MAX, 1),))


def keep_freed_memory() -> bool:
    """Freed blocks up to ``KEEP_BYTES`` stay in the heap; True when glibc took both settings."""
    return _mallopt(((M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES)))


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    taken = all(mallopt(param, value) == 1 for param, value in settings)
    if not taken:
        logger.debug("malloc settings not taken (not glibc?): freed memory goes back to the system")
    return taken
