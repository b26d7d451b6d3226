"""Where this project keeps what it builds for the user between runs: the demo's checkpoints
(``demo_training.py``) and the CPU decode kernel (``device_kernels/cpu_native.py``), under
``$XDG_CACHE_HOME/tgi-npu-backend``, else ``~/.cache/tgi-npu-backend`` (the XDG base-directory
convention)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tgi-npu-backend"
