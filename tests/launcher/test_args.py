"""Launcher flags: TGI names and defaults, refused flags, env fallbacks, shard command lines."""

from __future__ import annotations

import pytest
from tgi_npu_backend.launcher.args import RefusedFlag, find_num_shards, parse_args
from tgi_npu_backend.launcher.model_config import default_prefill_tokens, resolve_attention
from tgi_npu_backend.launcher.shards import download_command, serve_command, shard_env


def test_defaults_match_text_generation_launcher(monkeypatch):
    for var in ("MODEL_ID", "PORT", "MAX_CONCURRENT_REQUESTS"):
        monkeypatch.delenv(var, raising=False)
    a = parse_args([])
    assert a.model_id == "bigscience/bloom-560m" and a.port == 3000 and a.hostname == "0.0.0.0"
    assert (a.max_concurrent_requests, a.max_stop_sequences, a.max_top_n_tokens) == (128, 4, 5)
    assert (a.waiting_served_ratio, a.max_waiting_tokens) == (0.3, 20)
    assert a.shard_uds_path == "/tmp/text-generation-server" and a.master_port == 29500
    assert a.otlp_service_name == "text-generation-inference.router"


@pytest.mark.parametrize(
    "flag",
    ["--speculate", "--lora-adapters", "--ngrok", "--kv-cache-dtype",
     "--rope-scaling", "--rope-factor", "--weights-cache-override"],
)
def test_unsupported_flags_are_refused_by_name(flag):
    with pytest.raises(RefusedFlag, match=f"does not support {flag}"):
        parse_args([flag, "x"])


def test_argument_checks():
    with pytest.raises(
        RefusedFlag, match=r"`max_input_tokens`\(10\) must be < `max_total_tokens`\(10\)"
    ):
        parse_args(["--max-input-tokens", "10", "--max-total-tokens", "10"])
    with pytest.raises(RefusedFlag, match="Both `max_input_tokens`"):
        parse_args(["--max-input-tokens", "10", "--max-input-length", "10"])
    assert parse_args(["--max-input-length", "7"]).max_input_tokens == 7
    with pytest.raises(RefusedFlag, match="`max_total_tokens` must be <= `max_batch_total_tokens`"):
        parse_args(["--max-total-tokens", "100", "--max-batch-total-tokens", "50"])
    with pytest.raises(RefusedFlag, match="best_of"):
        parse_args(["--max-best-of", "2"])
    assert find_num_shards(None, None) == 1 and find_num_shards(True, 2) == 2
    with pytest.raises(RefusedFlag):
        find_num_shards(True, 1)


def test_env_fallback_but_not_hostname(monkeypatch):
    monkeypatch.setenv("PORT", "4321")
    monkeypatch.setenv("HOSTNAME", "my-container")
    a = parse_args(["--model-id", "m"])
    assert a.port == 4321 and a.hostname == "0.0.0.0"


def test_shard_command_lines_and_env(monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "debug")
    a = parse_args(
        [
            "--model-id",
            "/m",
            "--revision",
            "r1",
            "--dtype",
            "bfloat16",
            "--max-input-tokens",
            "9",
            "--max-total-tokens",
            "20",
            "--max-batch-size",
            "3",
            "--master-port",
            "1234",
        ]
    )
    assert download_command(a) == [
        "text-generation-server",
        "download-weights",
        "/m",
        "--extension",
        ".safetensors",
        "--logger-level",
        "INFO",
        "--json-output",
        "--merge-lora",
        "--revision",
        "r1",
    ]
    assert serve_command(a, 2, "DEBUG") == [
        "text-generation-server",
        "serve",
        "/m",
        "--uds-path",
        "/tmp/text-generation-server",
        "--logger-level",
        "DEBUG",
        "--json-output",
        "--sharded",
        "--dtype",
        "bfloat16",
        "--revision",
        "r1",
        "--otlp-service-name",
        "text-generation-inference.router",
        "--max-input-tokens",
        "9",
    ]
    env = shard_env(a, 1, 2, "paged", "0")
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "1",
        "2",
        "localhost",
        "1234",
    )
    assert env["ATTENTION"] == "paged" and env["PREFIX_CACHING"] == "0"
    assert env["MAX_TOTAL_TOKENS"] == "20" and env["MAX_BATCH_SIZE"] == "3"
    assert "CUDA_GRAPHS" not in env and env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert env["CUDA_MEMORY_FRACTION"] == "1.0" and "TGI_NPU_KV_CACHE_TOKENS" not in env
    assert "LOG_LEVEL" not in env


def test_attention_resolution_and_prefill_default():
    bloom = {"model_type": "bloom", "n_head": 16, "hidden_size": 1024}
    gemma = {
        "model_type": "gemma",
        "head_dim": 256,
        "num_attention_heads": 8,
        "max_position_embeddings": 8192,
    }
    assert resolve_attention(bloom, {}) == ("paged", "0")
    assert resolve_attention(gemma, {}) == ("flashinfer", "true")
    assert resolve_attention(gemma, {"ATTENTION": "paged"}) == ("paged", "0")
    assert resolve_attention({"model_type": "gemma", "head_dim": 32}, {}) == ("paged", "0")
    assert (
        default_prefill_tokens(gemma) == 4096
        and default_prefill_tokens({"max_position_embeddings": 2048}) == 2048
    )
    assert default_prefill_tokens(None) == 4096


def test_shard_json_log_lines_are_reemitted_at_their_level(caplog):
    import logging

    from tgi_npu_backend.launcher.logs import JsonFormatter, emit_shard_line

    logger = logging.getLogger("shard-test")
    with caplog.at_level(logging.DEBUG, logger="shard-test"):
        emit_shard_line(
            '{"text": "loaded\\n", "record": {"level": {"name": "WARNING"}}}\n', 0, logger
        )
        emit_shard_line("plain stdout noise\n", 1, logger)
    (warn, noise) = caplog.records
    assert (warn.levelno, warn.getMessage(), warn.rank) == (logging.WARNING, "loaded", 0)
    assert noise.levelno == logging.DEBUG
    line = JsonFormatter().format(warn)
    assert '"level": "WARNING"' in line and '"rank": 0' in line


@pytest.mark.parametrize(
    "var, value",
    [("SPECULATE", "2"), ("KV_CACHE_DTYPE", "fp8"), ("LORA_ADAPTERS", "a"),
     ("NGROK", "true"), ("TOKENIZER_CONFIG_PATH", "/t.json"), ("ROPE_SCALING", "linear"),
     ("ROPE_FACTOR", "2"), ("WEIGHTS_CACHE_OVERRIDE", "/w")],
)
def test_env_form_of_refused_flags_is_refused(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(RefusedFlag, match=f"{var}='{value}' \\(the environment form of --"):
        parse_args([])


def test_api_key_and_cors_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("NGROK", "false")  # off: nothing to refuse
    monkeypatch.setenv("NGROK_AUTHTOKEN", "tok")  # does nothing without NGROK
    monkeypatch.setenv("API_KEY", "from-env")
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", "http://a.example, http://b.example")
    a = parse_args([])
    assert a.api_key == "from-env" and "from-env" not in repr(a)  # never printed (--env)
    assert a.cors_allow_origin == ("http://a.example", "http://b.example")
    a = parse_args(["--api-key", "k", "--cors-allow-origin", "http://c", "--cors-allow-origin", "d"])
    assert a.api_key == "k" and a.cors_allow_origin == ("http://c", "d")
    with pytest.raises(RefusedFlag, match="graceful-termination-timeout"):
        parse_args(["--graceful-termination-timeout", "-1"])


def test_launcher_flags_that_meant_cuda_are_honoured_or_refused(monkeypatch):
    with pytest.raises(RefusedFlag, match=r"--cuda-graphs 1,2 \(or CUDA_GRAPHS\): the shards capture no graphs"):
        parse_args(["--cuda-graphs", "1,2"])
    monkeypatch.setenv("CUDA_GRAPHS", "4")
    with pytest.raises(RefusedFlag, match="--cuda-graphs 4"):
        parse_args([])
    monkeypatch.setenv("CUDA_GRAPHS", "0")  # accepted; the shard accepts it from its environment
    assert shard_env(parse_args([]), 0, 1, "paged", "0")["CUDA_GRAPHS"] == "0"
    monkeypatch.delenv("CUDA_GRAPHS")
    with pytest.raises(RefusedFlag, match="--cuda-memory-fraction 0.0"):
        parse_args(["--cuda-memory-fraction", "0"])
    a = parse_args(["--cuda-memory-fraction", "0.4", "--max-batch-total-tokens", "8192"])
    env = shard_env(a, 0, 1, "paged", "0")
    assert env["CUDA_MEMORY_FRACTION"] == "0.4" and env["TGI_NPU_KV_CACHE_TOKENS"] == "8192"
    with pytest.raises(RefusedFlag, match="validation_workers"):
        parse_args(["--validation-workers", "-1"])


def test_help_shows_defaults_and_variables(capsys):
    from tgi_npu_backend.launcher.args import build_parser

    text = " ".join(build_parser().format_help().split("options:")[1].split())
    assert "--port PORT [env: PORT] [default: 3000]" in text
    assert "[env: SHARD_UDS_PATH] [default: /tmp/text-generation-server]" in text
    assert "--max-input-tokens MAX_INPUT_TOKENS [env: MAX_INPUT_TOKENS] --" in text  # no default
    assert "[default: None]" not in text and "[default: False]" not in text
    assert "--hostname HOSTNAME [default: 0.0.0.0]" in text  # HOSTNAME is never read


def test_warmup_without_max_input_keeps_max_new_tokens_positive():
    from tgi_npu_backend.launcher.warmup import build_warmup_request

    req = build_warmup_request(None, 4096, 96, None)
    truncates = [r.truncate for r in req.batch.requests]
    assert sum(truncates) == 4096 and max(truncates) == 95
    assert all(r.stopping_parameters.max_new_tokens == 96 - r.truncate >= 1 for r in req.batch.requests)
    assert req.max_total_tokens == 96 and not req.HasField("max_input_tokens")
    with pytest.raises(RefusedFlag, match="--max-total-tokens 1: must be at least 2"):
        parse_args(["--max-total-tokens", "1"])
def test_quantize_is_passed_to_the_shards_or_read_from_config_json(monkeypatch):
    from tgi_npu_backend.launcher.model_config import resolve_quantize
    from tgi_npu_backend.launcher.shards import serve_command

    args = parse_args(["--quantize", "eetq"])
    assert args.quantize == "eetq"
    cmd = serve_command(args, 1, "INFO")
    assert cmd[cmd.index("--quantize") + 1] == "eetq"
    assert "--quantize" not in serve_command(parse_args([]), 1, "INFO")
    with pytest.raises(SystemExit):
        parse_args(["--quantize", "gptq"])  # argparse names the value and the choices
    ct = {"quantization_config": {"quant_method": "compressed-tensors"}}
    assert resolve_quantize(ct, None) == "compressed-tensors"
    assert resolve_quantize(ct, "eetq") == "eetq"  # the user's value wins, as in TGI
    assert resolve_quantize({"model_type": "bloom"}, None) is None
    assert resolve_quantize(None, None) is None
    monkeypatch.setenv("QUANTIZE", "awq")  # the environment form, as clap reads it
    with pytest.raises(RefusedFlag, match="--quantize awq: the shards serve eetq"):
        parse_args([])
