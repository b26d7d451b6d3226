"""Fixtures for the emulation's own tests: the pinned wheel, an installed emulation per test."""

from __future__ import annotations

import pytest

from tgi_npu_backend.npu_emulation import EmulationSettings, install, uninstall

from npu_wheel import Wheel, fetch_wheel


@pytest.fixture(scope="session")
def wheel() -> Wheel:
    path, why = fetch_wheel()
    if path is None:
        pytest.skip(f"the pinned torch-npu wheel is not cached and could not be fetched: {why}")
    return Wheel(path)


@pytest.fixture
def emu():
    """Install with default settings (910B); ``emu.configure(**settings)`` re-installs."""
    state = install(EmulationSettings())
    state.reset_counters()
    state.configure = lambda **kw: install(EmulationSettings(**kw))
    yield state
    install(EmulationSettings())  # later tests see defaults even without their own fixture
    uninstall()
