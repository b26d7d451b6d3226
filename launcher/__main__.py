"""``python -m tgi_npu_backend.launcher`` = ``tgi-npu-launcher``."""

from __future__ import annotations

from .cli import main

main()
