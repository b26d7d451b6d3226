"""Variables TGI's launcher derives from its flags: each one is honoured or refused by name,
in serve and in download-weights (the stock launcher sets them for both)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tgi_npu_backend.cli import main
from tgi_npu_backend.config import ServerConfig
from tgi_npu_backend.launcher_env import LAUNCHER_DEFAULT_CUDA_GRAPHS, notes


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"ROPE_SCALING": "linear", "ROPE_FACTOR": "2.0"}, "ROPE_SCALING=linear ROPE_FACTOR=2.0"),
        ({"ROPE_FACTOR": "4"}, "--rope-scaling/--rope-factor"),
        ({"WEIGHTS_CACHE_OVERRIDE": "/data/w"}, "WEIGHTS_CACHE_OVERRIDE=/data/w"),
        ({"CUDA_GRAPHS": "1,2"}, "CUDA_GRAPHS=1,2"),
        ({"CUDA_MEMORY_FRACTION": "1.5"}, "CUDA_MEMORY_FRACTION=1.5"),
        ({"CUDA_MEMORY_FRACTION": "most"}, "CUDA_MEMORY_FRACTION='most'"),
        ({"TGI_NPU_KV_CACHE_TOKENS": "0"}, "--kv-cache-tokens"),
        ({"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE=0"),
    ],
)
def test_unsupported_launcher_variables_are_refused_by_name(env, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        ServerConfig.from_cli(model_id="m", env=env)


def test_what_the_launcher_always_sets_is_accepted():
    env = {"CUDA_GRAPHS": LAUNCHER_DEFAULT_CUDA_GRAPHS, "CUDA_MEMORY_FRACTION": "1.0",
           "ROPE_SCALING": "", "WEIGHTS_CACHE_OVERRIDE": ""}
    cfg = ServerConfig.from_cli(model_id="m", env=env)
    assert cfg.kv_cache_fraction is None  # 1 = "not set": the device's default sizing
    assert notes(env) == [
        "CUDA_GRAPHS=1,2,4,8,16,32 (the launcher's default) has no effect: no graph capture on CPU/NPU"
    ]
    assert ServerConfig.from_cli(model_id="m", env={"CUDA_GRAPHS": "0"}).kv_cache_fraction is None
    assert notes({"CUDA_GRAPHS": "0"}) == []


def test_cuda_memory_fraction_becomes_the_kv_share():
    cfg = ServerConfig.from_cli(model_id="m", env={"CUDA_MEMORY_FRACTION": "0.3"})
    assert cfg.kv_cache_fraction == 0.3
    same = ServerConfig.from_cli(model_id="m", env={"CUDA_MEMORY_FRACTION": "0.3"}, kv_cache_fraction=0.3)
    assert same.kv_cache_fraction == 0.3
    with pytest.raises(ValueError, match="disagree; set only one"):
        ServerConfig.from_cli(model_id="m", env={"CUDA_MEMORY_FRACTION": "0.3",
                                                 "TGI_NPU_KV_CACHE_FRACTION": "0.1"})


def test_kv_tokens_and_batch_size_from_the_environment():
    cfg = ServerConfig.from_cli(model_id="m", env={"TGI_NPU_KV_CACHE_TOKENS": "4096", "MAX_BATCH_SIZE": "3"})
    assert (cfg.kv_cache_tokens, cfg.max_batch_size) == (4096, 3)
    assert ServerConfig.from_cli(model_id="m", env={}, kv_cache_tokens=64).kv_cache_tokens == 64


def test_download_weights_refuses_them_too(tmp_path):
    res = CliRunner().invoke(main, ["download-weights", str(tmp_path)],
                             env={"WEIGHTS_CACHE_OVERRIDE": "/data/w"})
    assert res.exit_code == 1 and "WEIGHTS_CACHE_OVERRIDE=/data/w" in res.output
