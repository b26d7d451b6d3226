"""Settings, install/uninstall, the fake torch.npu, counters and injected faults."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from npu_dense import Paged

from tgi_npu_backend.npu_emulation import (
    EmulationSettings, install, is_installed, state, uninstall,
)


def test_parse_the_env_string():
    s = EmulationSettings.parse("soc=310P,nnal=missing,mem_free=2GiB,mem_total=4GiB,devices=2,"
                                "fault=_npu_paged_attention")
    assert (s.soc, s.nnal_missing, s.mem_free, s.mem_total, s.device_count) == (
        "310P", True, 2 << 30, 4 << 30, 2)
    assert s.faults == {"_npu_paged_attention"} and s.family == "310P" and s.soc_version == 202
    assert EmulationSettings.parse("") == EmulationSettings()
    both = EmulationSettings.parse("fault=npu_rms_norm+oom:_npu_flash_attention,fault=npu_rotary_mul")
    assert both.faults == {"npu_rms_norm", "oom:_npu_flash_attention", "npu_rotary_mul"}
    assert EmulationSettings.parse("mem_free=64").mem_total == 16 << 30


@pytest.mark.parametrize("text,key", [
    ("soc=910C", "soc"), ("nnal=gone", "nnal"), ("mem_free=lots", "mem_free"),
    ("devices=two", "devices"), ("fault=_npu_nothing", "fault"), ("colour=red", "colour"),
    ("mem_free=8GiB,mem_total=4GiB", "mem_free/mem_total"), ("soc", "soc"),
])
def test_parse_errors_name_the_key(text, key):
    with pytest.raises(ValueError, match=f"^{key}"):
        EmulationSettings.parse(text)


@pytest.mark.parametrize("soc,version,name,family", [
    ("910B", 224, "Ascend910B4", "A2"), ("A3", 250, "Ascend910_9391", "A3"),
    ("310P", 202, "Ascend310P3", "310P"), ("Ascend910B2", 221, "Ascend910B2", "A2"),
])
def test_soc_versions_follow_torch_npu_and_vllm_ascend(emu, soc, version, name, family):
    emu.configure(soc=soc)
    assert torch.npu.get_soc_version() == version and torch.npu.get_device_name() == name
    assert state().settings.family == family
    assert torch.npu.is_bf16_supported() == (family != "310P")


def test_install_puts_torch_npu_and_torch_npu_in_place_and_uninstall_removes_them():
    st = install(EmulationSettings(device_count=2))
    try:
        import torch_npu

        assert is_installed() and sys.modules["torch_npu"] is torch_npu
        assert sys.modules["torch_npu.atb"] is torch_npu.atb and torch.npu is torch_npu.npu
        assert importlib.util.find_spec("torch_npu") is not None  # device_kernels/npu_platform.py npu_available()
        assert torch_npu.__version__ == "2.13.0"
        assert install(EmulationSettings(soc="A3")) is st and st.settings.soc == "A3"  # re-configure
    finally:
        uninstall()
    assert not is_installed() and "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    uninstall()  # idempotent


def test_fake_torch_npu_records_calls(emu):
    emu.configure(mem_free=3 << 30, mem_total=4 << 30, device_count=2)
    assert torch.npu.is_available() and torch.npu.device_count() == 2
    torch.npu.set_device(1)
    assert torch.npu.current_device() == 1
    assert torch.npu.mem_get_info() == (3 << 30, 4 << 30)
    torch.npu.synchronize()
    torch.npu.empty_cache()
    with pytest.raises(AssertionError, match="Invalid device id 2"):
        torch.npu.set_device("npu:2")
    names = [n for n, _ in emu.npu_calls]
    assert names[:8] == ["is_available", "device_count", "set_device", "current_device",
                         "mem_get_info", "synchronize", "empty_cache", "set_device"]
    assert emu.npu_calls[2] == ("set_device", (1,))


def test_torch_npu_has_no_out_of_memory_error(emu):
    """torch_npu 2.13.0 defines no torch.npu.OutOfMemoryError; the hint says what to catch."""
    with pytest.raises(AttributeError, match="torch.OutOfMemoryError"):
        torch.npu.OutOfMemoryError  # noqa: B018


def test_counters_masks_and_fallbacks(emu):
    emu.record_fallback("prefill", "float32 cache")
    emu.record_fallback("prefill", "float32 cache")
    emu.record_mask("alibi", torch.zeros(4, 8, dtype=torch.float16))
    emu.record_mask("small", torch.zeros(2))
    assert emu.fallbacks == {"prefill: float32 cache": 2} and emu.peak_mask_bytes == 64
    emu.reset_counters()
    assert not emu.calls and not emu.fallbacks and emu.peak_mask_bytes == 0 and not emu.npu_calls


def _decode(torch_npu):
    paged = Paged([9], 16, 2, 64, torch.float16)
    q = torch.randn(1, 2, 64).half()
    out = torch.empty_like(q)
    torch_npu._npu_paged_attention(q, paged.key_cache, paged.value_cache, 2, 2, 0.125,
                                   paged.block_table, torch.tensor([9], dtype=torch.int32), out)
    return out


def test_injected_faults(emu):
    import torch_npu

    torch.manual_seed(0)
    good = _decode(torch_npu)
    emu.configure(faults=frozenset({"_npu_paged_attention"}))
    torch.manual_seed(0)
    torch.testing.assert_close(_decode(torch_npu), good + 1)
    emu.configure(faults=frozenset({"oom:_npu_paged_attention"}))
    with pytest.raises(torch.OutOfMemoryError, match="NPU out of memory"):
        _decode(torch_npu)
    emu.configure(faults=frozenset({"oom-rt:_npu_paged_attention"}))
    with pytest.raises(RuntimeError, match="^NPU out of memory"):
        _decode(torch_npu)
    emu.configure(faults=frozenset({"npu_rms_norm"}))
    x, w = torch.randn(2, 8), torch.ones(8)
    y, _ = torch_npu.npu_rms_norm(x, w)
    emu.configure()
    torch.testing.assert_close(y - 1, torch_npu.npu_rms_norm(x, w)[0])
    assert emu.calls["_npu_paged_attention"] == 4 and emu.calls["npu_rms_norm"] == 2
