"""The installed package version (for /info and ``system_fingerprint``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("tgi-npu-backend")
    except PackageNotFoundError:
        return "0.0.0"


VERSION = package_version()
