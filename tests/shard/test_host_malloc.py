"""``host_malloc``'s two settings: the large tensors of a forward pass, freed and allocated
again pass after pass on the generator thread, are memory the process kept, not pages faulted in
anew (checked in a fresh interpreter: the settings are per process, and the arena one must come
before other threads allocate). The figure is the page faults of the last 4 of 8 passes; every
pass faulting its buffers in anew is ~53,000 (13,313 each), as without the settings. With them,
glibc's heap still grows once in a while (a pass in ~6 faulted here), hence a bound of half."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

PROBE = """
import resource, sys, threading
from tgi_npu_backend.host_malloc import keep_freed_memory, one_arena
taken = all([one_arena(), keep_freed_memory()]) if sys.argv[1] == "keep" else None
import torch

def mlp_passes(out):  # a layer's MLP over a prefill's rows, as on the generator thread
    x, w = torch.ones(3328, 1024), torch.ones(4096, 1024)
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        h = torch.nn.functional.linear(x, w)  # [3328, 4096]: 54.5 MB, freed below
        torch.nn.functional.linear(torch.ops.aten.gelu_(h), w.t())
        del h
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

out = []
t = threading.Thread(target=mlp_passes, args=(out,))
t.start(); t.join()
print(taken, sum(out[-4:]))
"""


def _probe(mode: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    taken, faults = done.stdout.split()
    return taken, int(faults)


def test_freed_memory_is_reused_without_page_faults():
    taken, faults = _probe("keep")
    assert taken == "True"
    assert faults < 26_000


def test_without_the_settings_the_buffer_faults_in_again():
    """What the settings are for (unless the kernel backs the buffer with huge pages anyway)."""
    _, faults = _probe("default")
    if faults < 1000:
        pytest.skip(f"{faults} faults: transparent huge pages back malloc here")
    assert faults > 40_000


def test_a_cpu_platform_keeps_freed_memory_from_set_device():
    """``Platform.set_device`` applies ``keep_freed_memory`` where the model runs on the CPU (in a
    fresh interpreter: it also turns on flush-to-zero for the calling thread)."""
    probe = (
        "from tgi_npu_backend import host_malloc\n"
        "from tgi_npu_backend.device import CPU\n"
        "calls = []\n"
        "host_malloc.keep_freed_memory = lambda: calls.append(1) or True\n"
        "CPU.set_device()\n"
        "print(calls == [1])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True"], done.stdout + done.stderr
