"""The NPU platform's startup through the real load path, on the emulated NPU: block size, dtype,
set_device before the process group, KV sizing from mem_get_info, and the refusals (310P, no
NNAL) that must happen before the socket appears."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
import pytest
import torch

from tgi_npu_backend.config import ServerConfig
from tgi_npu_backend.errors import grpc_status, is_device_oom


@pytest.fixture(scope="module")
def gemma256_dir(tmp_path_factory):
    """Gemma-7B's head_dim 256 (MindIE serves it with block size 64)."""
    from tgi_npu_backend.demo import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("gemma256"), "gemma", seed=5, head_dim=256)


def _config(model_dir, **kw) -> ServerConfig:
    env = {"TGI_NPU_EMULATION": kw.pop("emulation", "")}
    return ServerConfig.from_cli(model_id=str(model_dir), env=env, device="npu-emulated", **kw)


@pytest.fixture
def uninstall_after():
    yield
    from tgi_npu_backend.npu_emulation import is_installed, uninstall

    if is_installed():
        uninstall()


@pytest.mark.parametrize("ckpt,block_size", [("bloom_dir", 128), ("gemma256_dir", 64)])
def test_block_size_and_dtype_come_from_the_npu_backend(ckpt, block_size, request, uninstall_after):
    from tgi_npu_backend.npu_emulation import state

    from tgi_npu_backend.load import build_generator

    gen = build_generator(_config(request.getfixturevalue(ckpt)))
    info = gen.info()
    assert info.block_size == block_size and info.device_type == "npu-emulated"
    assert info.attention_impl == "paged-npu"
    assert gen.settings.dtype == torch.float16  # the demo checkpoints are float32: NPU default is fp16
    names = [name for name, _ in state().npu_calls]
    assert "set_device" in names


def test_set_device_comes_before_the_process_group(bloom_dir, monkeypatch, uninstall_after):
    from tgi_npu_backend.npu_emulation import state

    from tgi_npu_backend import load

    seen = {}

    def fake_init_parallel(*args, **kwargs):
        seen["calls"] = [name for name, _ in state().npu_calls]
        seen["backend"] = args[4]
        from tgi_npu_backend.distributed import ParallelContext

        return ParallelContext()

    monkeypatch.setattr(load, "init_parallel", fake_init_parallel)
    load.build_generator(_config(bloom_dir))
    assert "set_device" in seen["calls"]
    assert seen["backend"] == "gloo"  # an emulated NPU set talks over gloo, never HCCL


def test_kv_pool_is_sized_from_npu_free_memory(bloom_dir, uninstall_after):
    from router_sim import RouterSim  # noqa: F401  (the warmup batch shape)

    from tgi_npu_backend.load import build_generator

    free = 64 << 20
    gen = build_generator(_config(bloom_dir, emulation=f"mem_free={free},mem_total={4 * free}",
                                  kv_cache_fraction=0.5))
    from tgi_npu_backend.kv_sizing import size_kv_pool

    spec = gen.settings.kv_spec
    expected = (free // 2) // spec.bytes_per_block
    pool = size_kv_pool(gen.settings, max_prefill=64, max_total=None, model_max_length=None)
    assert pool.num_blocks == expected and "0.5 of the" in pool.reason


def test_310p_is_refused_naming_what_is_missing(bloom_dir, uninstall_after):
    from tgi_npu_backend.load import build_generator

    with pytest.raises(ValueError, match="310P") as err:
        build_generator(_config(bloom_dir, emulation="soc=310P"))
    assert "NZ" in str(err.value) and "A2/A3" in str(err.value)


def test_missing_nnal_is_refused_before_warmup(bloom_dir, uninstall_after):
    from tgi_npu_backend.load import build_generator

    with pytest.raises(ValueError, match="NNAL") as err:
        build_generator(_config(bloom_dir, emulation="nnal=missing"))
    assert "set_env.sh" in str(err.value)


@pytest.mark.parametrize("emulation,needle", [("soc=310P", "310P"), ("nnal=missing", "NNAL")])
def test_cli_exits_before_the_socket_appears(bloom_dir, emulation, needle):
    uds = f"{tempfile.gettempdir()}/tgi-npu-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [sys.executable, "-m", "tgi_npu_backend.cli", "serve", str(bloom_dir), "--uds-path", uds,
         "--device", "npu-emulated"],
        env={**__import__("os").environ, "TGI_NPU_EMULATION": emulation},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert needle in proc.stderr
    assert not Path(f"{uds}-0").exists()


def test_npu_out_of_memory_in_both_forms_is_fatal():
    for err in (torch.OutOfMemoryError("NPU out of memory"),
                RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 60.00 GiB total)")):
        assert is_device_oom(err)
        assert grpc_status(err) == (grpc.StatusCode.INTERNAL, True)
    assert not is_device_oom(RuntimeError("shape mismatch"))
    assert grpc_status(RuntimeError("shape mismatch"))[1] is False
