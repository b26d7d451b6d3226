"""The command line the stock launcher runs: every flag it passes, the env it sets, the log format
it parses, and download-weights for local directories, .bin checkpoints and hub ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest
import torch
from click.testing import CliRunner

from router_sim import start_shard
from tgi_npu_backend.cli import main
from tgi_npu_backend.config import ServerConfig

LAUNCHER_ENV = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
                "ATTENTION": "flashinfer", "PREFIX_CACHING": "true", "HF_HUB_CACHE": "/tmp/hub",
                "WATERMARK_GAMMA": "0.25", "WATERMARK_DELTA": "1.5", "CUDA_GRAPHS": "1,2,4,8,16,32",
                "DISABLE_CUSTOM_KERNELS": "True", "HF_HUB_ENABLE_HF_TRANSFER": "1"}


def test_config_reads_launcher_env_as_hints():
    cfg = ServerConfig.from_cli(model_id="m", env=LAUNCHER_ENV, logger_level="WARN")
    assert (cfg.rank, cfg.world_size, cfg.master_port) == (0, 1, 29500)
    assert (cfg.attention_hint, cfg.prefix_caching) == ("flashinfer", True)
    for raw, on in (("1", True), ("TRUE", True), ("True", True), ("0", False), ("false", False), ("", False)):
        assert ServerConfig.from_cli(model_id="m", env={"PREFIX_CACHING": raw}).prefix_caching is on
    assert cfg.hub_cache == "/tmp/hub" and cfg.watermark_gamma == 0.25 and cfg.watermark_delta == 1.5
    assert cfg.log_level == "WARNING"
    assert ServerConfig.from_cli(model_id="m", env={}, logger_level="OFF").log_level is None
    assert ServerConfig.from_cli(model_id="m", env={}).cpu_gemm == "auto"
    assert ServerConfig.from_cli(model_id="m", env={"TGI_NPU_CPU_GEMM": "plain"}).cpu_gemm == "plain"
    assert ServerConfig.from_cli(model_id="m", env={}).cpu_attention == "auto"
    torch_ops = ServerConfig.from_cli(model_id="m", env={"TGI_NPU_CPU_ATTENTION": "torch"})
    assert torch_ops.cpu_attention == "torch"
    env = dict(LAUNCHER_ENV, RANK="1", WORLD_SIZE="2")
    cfg = ServerConfig.from_cli(model_id="m", env=env, sharded=True)
    assert cfg.socket_path == "/tmp/text-generation-server-1"
    assert cfg.server_urls == ["unix:///tmp/text-generation-server-0", "unix:///tmp/text-generation-server-1"]


@pytest.mark.parametrize(
    "flags, env, needle",
    [
        ({"quantize": "gptq"}, {}, "--quantize gptq"),
        ({"speculate": 2}, {}, "--speculate 2"),
        ({"kv_cache_dtype": "fp8_e5m2"}, {}, "--kv-cache-dtype"),
        ({"dtype": "float64"}, {}, "--dtype float64"),
        ({"logger_level": "LOUD"}, {}, "--logger-level LOUD"),
        ({"max_input_tokens": 0}, {}, "--max-input-tokens"),
        ({}, {"LORA_ADAPTERS": "a,b"}, "LORA_ADAPTERS"),
        ({"sharded": True}, {}, "RANK and WORLD_SIZE"),
        ({}, {"RANK": "0", "WORLD_SIZE": "2"}, "--sharded"),
        ({}, {"TGI_NPU_KV_CACHE_FRACTION": "2"}, "--kv-cache-fraction"),
        ({}, {"TGI_NPU_CPU_GEMM": "fast"}, "TGI_NPU_CPU_GEMM='fast': use one of auto, packed, plain"),
        ({}, {"TGI_NPU_CPU_ATTENTION": "c"}, "TGI_NPU_CPU_ATTENTION='c': use one of auto, torch"),
    ],
)
def test_unsupported_values_name_the_flag(flags, env, needle):
    with pytest.raises(ValueError, match=needle.replace("-", r"\-")):
        ServerConfig.from_cli(model_id="m", env=env, **flags)


def test_serve_fails_at_startup_naming_the_flag(bloom_dir):
    res = CliRunner().invoke(main, ["serve", str(bloom_dir), "--quantize", "awq"])
    assert res.exit_code == 1 and "--quantize awq" in res.output


def test_launcher_command_line_json_logs_and_socket(bloom_dir, tmp_path):
    """The exact argv of launcher/src/main.rs shard_manager; stdout is loguru JSON lines."""
    uds = f"{tempfile.gettempdir()}/tgi-cli-{uuid.uuid4().hex[:8]}"
    proc = start_shard(
        bloom_dir, uds, env=LAUNCHER_ENV,
        extra_args=["--dtype", "bfloat16", "--revision", "main", "--otlp-endpoint", "http://localhost:4317",
                    "--max-input-tokens", "100"],
    )
    proc.terminate()
    assert proc.wait(30) == 0
    lines = [json.loads(line) for line in proc.stdout.read().splitlines() if line.strip()]
    assert lines, "the launcher needs JSON log lines on stdout"
    for rec in lines:
        assert rec["text"] and rec["record"]["level"]["name"] in {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}
    texts = [r["record"]["message"] for r in lines]
    load = next(i for i, t in enumerate(texts) if t.startswith("loading"))
    started = next(i for i, t in enumerate(texts) if t.startswith("Server started"))
    assert load < started and "bfloat16" in texts[load]  # socket only after the model is loaded


def test_logger_level_warn_and_off(bloom_dir):
    for level, expect_info in (("WARN", False), ("OFF", False), ("DEBUG", True)):
        uds = f"{tempfile.gettempdir()}/tgi-cli-{uuid.uuid4().hex[:8]}"
        proc = start_shard(bloom_dir, uds, extra_args=["--logger-level", level])
        proc.terminate()
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert ('"INFO"' in out) == expect_info, (level, out[:500])


def _download(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tgi_npu_backend.cli", "download-weights", *args, "--extension", ".safetensors",
         "--logger-level", "INFO", "--json-output", "--merge-lora"],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120,
    )


def test_download_weights_local_dir(bloom_dir, tmp_path):
    assert _download(str(bloom_dir)).returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _download(str(empty))
    assert res.returncode == 1 and "no *.safetensors" in res.stderr


def test_download_weights_converts_bin_without_unpickling_code(bloom_dir, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "bin"
    shutil.copytree(bloom_dir, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"]  # shared storage
    torch.save(state, d / "pytorch_model.bin")
    assert _download(str(d)).returncode == 0
    converted = load_file(str(d / "pytorch_model.safetensors"))
    assert "lm_head.weight" not in converted  # tied tensor stored once
    assert all(torch.equal(converted[k], v) for k, v in state.items() if k in converted)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/pwned-by-pickle",))

    e = tmp_path / "evil"
    e.mkdir()
    torch.save({"x": Evil()}, e / "pytorch_model.bin")
    res = _download(str(e))
    assert res.returncode == 1 and "more than plain tensors" in res.stderr
    assert not os.path.exists("/tmp/pwned-by-pickle")


def test_hub_id_from_cache_and_offline_error(bloom_dir, tmp_path):
    """A hub id resolves through huggingface_hub's cache layout (no network here)."""
    cache = tmp_path / "hub"
    snap = cache / "models--bigscience--tiny-bloom" / "snapshots" / "abc123"
    shutil.copytree(bloom_dir, snap)
    (cache / "models--bigscience--tiny-bloom" / "refs").mkdir()
    (cache / "models--bigscience--tiny-bloom" / "refs" / "main").write_text("abc123")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    assert _download("bigscience/tiny-bloom", env=env).returncode == 0
    res = _download("bigscience/not-here", env=env)
    assert res.returncode == 1 and "bigscience/not-here" in res.stderr

    from tgi_npu_backend.hub import resolve_model_dir

    assert resolve_model_dir("bigscience/tiny-bloom", cache_dir=str(cache)) == snap
    uds = f"{tempfile.gettempdir()}/tgi-cli-{uuid.uuid4().hex[:8]}"
    proc = start_shard("bigscience/tiny-bloom", uds, env=env)  # serve by hub id
    proc.terminate()
    assert proc.wait(30) == 0


@pytest.mark.parametrize("model_type, arch", [("gemma2", "Gemma2ForCausalLM"), ("gemma3_text", "Gemma3ForCausalLM"),
                                              ("llama", "LlamaForCausalLM")])
def test_unsupported_architectures_are_refused_at_startup(gemma_mqa_dir, tmp_path, model_type, arch):
    d = tmp_path / model_type
    shutil.copytree(gemma_mqa_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=[arch], final_logit_softcapping=30.0, sliding_window=4096)
    (d / "config.json").write_text(json.dumps(cfg))
    res = subprocess.run([sys.executable, "-m", "tgi_npu_backend.cli", "serve", str(d), "--uds-path",
                          f"{tempfile.gettempdir()}/tgi-cli-{uuid.uuid4().hex[:8]}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert model_type in res.stderr, res.stderr[-2000:]


def test_otlp_endpoint_exports_spans_to_a_collector(bloom_dir):
    """--otlp-endpoint (as the launcher passes it): spans reach an OTLP/gRPC collector."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from router_sim import RouterSim

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        uds = f"{tempfile.gettempdir()}/tgi-cli-{uuid.uuid4().hex[:8]}"
        proc = start_shard(bloom_dir, uds, extra_args=["--otlp-endpoint", f"http://127.0.0.1:{port}",
                                                       "--otlp-service-name", "tgi-npu-test"])
        RouterSim(f"{uds}-0", None).startup(max_input=32, max_prefill=32)
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        collector.stop(None)
    spans = {}
    for req in received:
        for rs in req.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    spans[span.name] = service
    for rpc in ("ServiceDiscovery", "ClearCache", "Info", "Warmup"):
        assert spans.get(f"generate.v3.TextGenerationService/{rpc}") == "tgi-npu-test", spans


@pytest.mark.parametrize("has_safetensors", [True, False])
def test_download_weights_from_the_hub_fetches_what_serving_needs(bloom_dir, tmp_path, monkeypatch, has_safetensors):
    """The hub path with huggingface_hub's calls replaced by a local fake repository."""
    import huggingface_hub
    from safetensors.torch import load_file

    from tgi_npu_backend import hub

    repo = tmp_path / "repo"
    shutil.copytree(bloom_dir, repo)
    if not has_safetensors:
        torch.save(load_file(str(repo / "model.safetensors")), repo / "pytorch_model.bin")
        (repo / "model.safetensors").unlink()
    calls = []

    class FakeApi:
        def list_repo_files(self, repo_id, revision=None):
            return [p.name for p in repo.iterdir()]

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        calls.append((repo_id, revision, allow_patterns))
        out = tmp_path / "snapshot"
        out.mkdir(exist_ok=True)
        import fnmatch

        for p in repo.iterdir():
            if any(fnmatch.fnmatch(p.name, pat) for pat in allow_patterns):
                shutil.copy(p, out / p.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "check_hub_reachable", lambda model_id, env: None)  # no network here
    local = hub.download_weights("bigscience/bloom-tiny", revision="main")
    assert calls[0][:2] == ("bigscience/bloom-tiny", "main")
    for needed in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (local / needed).exists(), needed
    assert list(local.glob("*.safetensors")), "weights end up as safetensors"
    if not has_safetensors:
        assert "*.bin" in calls[0][2] and (local / "pytorch_model.safetensors").exists()


def test_download_weights_refuses_a_lora_adapter(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "bigscience/bloom-560m"}))
    (d / "adapter_model.safetensors").write_bytes(b"")
    res = _download(str(d))
    assert res.returncode == 1 and "PEFT/LoRA adapter" in res.stderr
