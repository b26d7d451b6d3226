"""``text-generation-server``: the command the stock TGI launcher runs (``serve``, ``download-weights``).

This is the only module that reads the shard's settings from the environment; it builds a frozen
ServerConfig (``config.py`` lists the three build-location variables read where they are used).
"""

from __future__ import annotations

import os
import sys

import click
from loguru import logger

from . import launcher_env
from .config import ServerConfig, normalize_log_level

KV_FRACTION_HELP = (
    "Share of memory given to the paged KV pool, measured after the model is loaded and the "
    "warmup batch has run: on CPU a share of MemAvailable (/proc/meminfo), on NPU of free device "
    "memory. Default: on NPU 0.9; on CPU what the limits need (MAX_BATCH_SIZE, default 8, "
    "requests of max_total_tokens), at most 0.2. Env: TGI_NPU_KV_CACHE_FRACTION; TGI's "
    "CUDA_MEMORY_FRACTION (--cuda-memory-fraction) below 1 counts as this."
)
KV_TOKENS_HELP = (
    "Size the KV pool for exactly this many tokens instead (wins over --kv-cache-fraction). "
    "Env: TGI_NPU_KV_CACHE_TOKENS (tgi-npu-launcher sets it from --max-batch-total-tokens)."
)


DIST_TIMEOUT_HELP = (
    "Tensor parallel (--sharded): seconds a rank waits for its peers at the rendezvous and in "
    "each collective, and after which a peer that sent no heartbeat counts as dead; this shard "
    "then exits (status 1) so the launcher tears the set down. Default 120. "
    "Env: TGI_NPU_DIST_TIMEOUT."
)


def setup_logging(level: str | None, json_output: bool) -> None:
    """loguru on stdout; with --json-output one serialized JSON record per line (the launcher
    parses ``record.level.name`` and ``text``)."""
    logger.remove()
    if level is None:  # --logger-level OFF
        return
    logger.add(
        sys.stdout,
        format="{message}",
        filter="tgi_npu_backend",
        level=level,
        serialize=json_output,
        backtrace=True,
        diagnose=False,
    )


def _fail(message: str) -> None:
    """Print ``message`` once, on stderr (both launchers show a failed shard's stderr), and exit 1."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"show_default": True})
def main() -> None:
    """TGI v3 model server (shard) for BLOOM and Gemma on Ascend NPUs (CPU fallback)."""


@main.command()
@click.argument("model_id")
@click.option("--revision", default=None)
@click.option("--sharded/--no-sharded", default=False, help="Tensor parallel: RANK/WORLD_SIZE from env.")
@click.option(
    "--quantize",
    default=None,
    help="eetq (int8 weights quantized at load) | compressed-tensors | msmodelslim (int8 "
    "W8A8/W8A16 checkpoints; detected from the model directory when omitted).",
)
@click.option("--speculate", type=int, default=None, help="Not supported: any value > 0 is refused.")
@click.option("--dtype", default=None, help="float32 | float16 | bfloat16 (CPU default float32).")
@click.option("--kv-cache-dtype", default=None, help="Not supported: any value is refused.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False)
@click.option("--uds-path", default="/tmp/text-generation-server", help="Socket base; '-{rank}' is appended.")
@click.option("--logger-level", default="INFO", help="TRACE|DEBUG|INFO|WARN|ERROR|OFF")
@click.option("--json-output/--no-json-output", default=False)
@click.option("--otlp-endpoint", default=None, help="OTLP/gRPC collector for traces (one span per RPC).")
@click.option("--otlp-service-name", default="text-generation-inference.server")
@click.option("--max-input-tokens", type=int, default=None)
@click.option(
    "--device",
    default="auto",
    help="auto | cpu | npu | npu-emulated (env TGI_NPU_DEVICE). npu-emulated is a verification "
    "mode: the NPU code path on CPU through the torch_npu emulation (knobs: TGI_NPU_EMULATION).",
)
@click.option("--block-size", type=int, default=None, help="KV block size (multiple of 16, <= 128). Env: TGI_NPU_BLOCK_SIZE.")
@click.option("--kv-cache-fraction", type=float, default=None, help=KV_FRACTION_HELP)
@click.option("--kv-cache-tokens", type=int, default=None, help=KV_TOKENS_HELP)
@click.option("--dist-timeout", type=float, default=None, help=DIST_TIMEOUT_HELP)
def serve(model_id: str, **flags) -> None:
    """Serve MODEL_ID (local directory or hub id) over TGI's v3 gRPC interface."""
    try:
        config = ServerConfig.from_cli(model_id=model_id, env=dict(os.environ), **flags)
    except ValueError as err:
        setup_logging("INFO", flags.get("json_output", False))
        _fail(str(err))
    setup_logging(config.log_level, config.json_output)
    for note in launcher_env.notes(os.environ):
        logger.info(note)
    from .errors import FatalError
    from .server import serve as run_server

    try:
        run_server(config)
    except (ValueError, FatalError) as err:  # unsupported model, bad checkpoint, sizes, no peers
        _fail(str(err))


@main.command()
@click.argument("model_id")
@click.option("--revision", default=None)
@click.option("--device", default="auto", help="npu (an Ascend host) or npu-emulated (env TGI_NPU_DEVICE).")
@click.option("--dtype", default=None, help="float16 | bfloat16 (default: the checkpoint's half type).")
@click.option("--block-size", type=int, default=None, help="Default: the NPU backend's choice (128, 64 for head_dim 256).")
@click.option("--steps", type=int, default=4, show_default=True, help="Greedy decode steps of the model check.")
@click.option(
    "--skip-model/--with-model", default=False,
    help="Operators only (the model check loads the whole model on one card).",
)
def selftest(model_id: str, revision, device, dtype, block_size, steps, skip_model) -> None:
    """Check every NPU operator the backend uses against the reference kernels at MODEL_ID's
    shapes, then a few greedy decode steps on both paths; print one table, exit 1 on a failure.
    The first thing to run on a new Ascend host."""
    setup_logging("WARNING", False)
    try:
        config = ServerConfig.from_cli(
            model_id=model_id, env=dict(os.environ), revision=revision, device=device,
            dtype=dtype, block_size=block_size,
        )
        from .selftest import run

        ok = run(config, steps=steps, check_model=not skip_model)
    except ValueError as err:
        _fail(str(err))
    if not ok:
        click.echo("selftest: FAILED (see the rows marked FAIL)", err=True)
        sys.exit(1)
    click.echo("selftest: all checks passed")


@main.command("download-weights")
@click.argument("model_id")
@click.option("--revision", default=None)
@click.option("--extension", default=".safetensors")
@click.option("--auto-convert/--no-auto-convert", default=True)
@click.option("--logger-level", default="INFO")
@click.option("--json-output/--no-json-output", default=False)
@click.option("--trust-remote-code/--no-trust-remote-code", default=False)
@click.option("--merge-lora/--no-merge-lora", default=False, help="Accepted; LoRA adapters are not supported.")
def download_weights(
    model_id: str,
    revision: str | None,
    extension: str,
    auto_convert: bool,
    logger_level: str,
    json_output: bool,
    trust_remote_code: bool,
    merge_lora: bool,
) -> None:
    """Make MODEL_ID's safetensors weights available locally (converting .bin safely if needed)."""
    try:
        setup_logging(normalize_log_level(logger_level), json_output)
        launcher_env.check_unsupported(os.environ)
    except ValueError as err:
        setup_logging("INFO", json_output)
        _fail(str(err))
    from .hub import download_weights as fetch

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    try:
        path = fetch(
            model_id, revision=revision, extension=extension, auto_convert=auto_convert,
            cache_dir=cache, env=dict(os.environ),
        )
    except ValueError as err:
        _fail(str(err))
    logger.info(f"weights for {model_id} are in {path}")


if __name__ == "__main__":
    main()
