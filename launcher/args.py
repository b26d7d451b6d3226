"""``tgi-npu-launcher`` flags: the names, defaults and env fallbacks of
``text-generation-launcher`` (TGI ``launcher/src/main.rs``) for what this launcher supports.
Flags it does not support are refused by name, with the reason."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from tgi_npu_backend.models.layers.quant.detect import SUPPORTED as QUANTIZE

# Flags of text-generation-launcher that this launcher refuses, and why.
REFUSED: dict[str, str] = {
    "--kv-cache-dtype": "the KV cache uses the model dtype",
    "--speculate": "speculative decoding is not implemented by the shard",
    "--lora-adapters": "LoRA adapters are not supported (unknown adapter_id falls back to the base model)",
    "--ngrok": "ngrok tunnelling is not implemented",
    "--ngrok-authtoken": "ngrok tunnelling is not implemented",
    "--ngrok-edge": "ngrok tunnelling is not implemented",
    "--tokenizer-config-path": "the tokenizer (and chat template) is always the model's own",
    "--rope-scaling": "RoPE scaling is not supported by the shard (BLOOM has no rotary embeddings; "
    "Gemma is served at its trained context length)",
    "--rope-factor": "RoPE scaling is not supported by the shard (BLOOM has no rotary embeddings; "
    "Gemma is served at its trained context length)",
    "--weights-cache-override": "pass the directory that holds the model (config.json, tokenizer "
    "and *.safetensors) as --model-id instead",
}

# The environment forms of refused flags (clap reads each flag's UPPER_SNAKE variable), refused
# the same way. NGROK_AUTHTOKEN/NGROK_EDGE are left alone: they do nothing without NGROK, and the
# ngrok CLI's own users have them set.
REFUSED_ENV = (
    "--kv-cache-dtype",
    "--speculate",
    "--lora-adapters",
    "--ngrok",
    "--tokenizer-config-path",
    "--rope-scaling",
    "--rope-factor",
    "--weights-cache-override",
)

BOOL_TRUE = {"1", "true", "yes", "on"}


class RefusedFlag(ValueError):
    pass


@dataclass(frozen=True)
class LauncherArgs:
    model_id: str
    revision: str | None
    validation_workers: int
    sharded: bool | None
    num_shard: int | None
    dtype: str | None
    trust_remote_code: bool
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int | None
    max_total_tokens: int | None
    waiting_served_ratio: float
    max_batch_prefill_tokens: int | None
    max_batch_total_tokens: int | None
    max_waiting_tokens: int
    max_batch_size: int | None
    cuda_graphs: str | None
    hostname: str
    port: int
    prometheus_port: int | None
    shard_uds_path: str
    master_addr: str
    master_port: int
    huggingface_hub_cache: str | None
    disable_custom_kernels: bool
    cuda_memory_fraction: float
    json_output: bool
    otlp_endpoint: str | None
    otlp_service_name: str
    watermark_gamma: float | None
    watermark_delta: float | None
    disable_grammar_support: bool
    env: bool
    max_client_batch_size: int
    usage_stats: str
    payload_limit: int
    enable_prefill_logprobs: bool
    graceful_termination_timeout: int
    api_key: str | None = field(default=None, repr=False)  # never printed (--env, logs)
    cors_allow_origin: tuple[str, ...] = ()
    quantize: str | None = None  # passed to the shards; None: config.json's quant_method (cli.py)


def _env(name: str, default):
    # NOTE: like clap's `env`, each flag falls back to its UPPER_SNAKE env var. HOSTNAME is the
    # exception: shells and containers set it to the machine name, never a bind address.
    if name == "hostname":
        return default
    return os.environ.get(name.upper(), default)


def _bool(value: str | bool) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in BOOL_TRUE


def _help(text: str, dest: str, default) -> str:
    """``text``, then, as clap's help does, the variable the flag also reads and its default
    (the variable's value when it is set)."""
    extras = [] if dest == "hostname" else [f"[env: {dest.upper()}]"]
    if default not in (None, False):
        extras.append("[default: %(default)s]")
    return " ".join([text.replace("%", "%%"), *extras]).strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tgi-npu-launcher",
        description="Start text-generation-server shards and serve TGI's HTTP API "
        "(a Python stand-in for text-generation-launcher + the v3 router). Unsupported TGI "
        f"flags are refused by name: {', '.join(REFUSED)}.",
    )

    def opt(name: str, type_=str, default=None, help_: str = "", **kw):
        dest = name.lstrip("-").replace("-", "_")
        value = _env(dest, default)
        p.add_argument(name, type=type_, default=value, help=_help(help_, dest, value), **kw)

    def flag(name: str, help_: str = ""):
        dest = name.lstrip("-").replace("-", "_")
        value = _bool(_env(dest, False))
        p.add_argument(name, action="store_true", default=value, help=_help(help_, dest, value))

    opt("--model-id", default="bigscience/bloom-560m", help_="local directory or hub id")
    opt("--revision")
    opt(
        "--validation-workers", int, 2,
        "threads that tokenize long prompts (over 4096 characters) off the event loop; shorter "
        "ones are tokenized inline",
    )
    opt("--sharded", _bool, help_="true/false: shard the model over --num-shard processes")
    opt("--num-shard", int)
    opt("--dtype", choices=["float16", "bfloat16", "float32"])
    opt("--quantize", choices=list(QUANTIZE),
        help_="int8: eetq (quantized at load), compressed-tensors, msmodelslim (checkpoints); "
        "default: config.json's quantization_config.quant_method")
    flag("--trust-remote-code")
    opt("--max-concurrent-requests", int, 128)
    opt("--max-best-of", int, 1, "only 1 is supported")
    opt("--max-stop-sequences", int, 4)
    opt("--max-top-n-tokens", int, 5)
    opt("--max-input-tokens", int)
    opt("--max-input-length", int, help_="deprecated alias of --max-input-tokens")
    opt("--max-total-tokens", int)
    opt("--waiting-served-ratio", float, 0.3)
    opt("--max-batch-prefill-tokens", int)
    opt(
        "--max-batch-total-tokens", int,
        help_="size the shards' KV pool for this many tokens (passed as TGI_NPU_KV_CACHE_TOKENS); "
        "default: the shard's sizing (see its --kv-cache-fraction)",
    )
    opt("--max-waiting-tokens", int, 20)
    opt("--max-batch-size", int)
    opt("--cuda-graphs", help_="only 0 (off) is accepted: the shards capture no graphs on CPU/NPU")
    opt("--hostname", default="0.0.0.0")
    opt("--port", int, 3000)
    p.add_argument("-p", dest="port", type=int, help=argparse.SUPPRESS)
    opt("--prometheus-port", int, help_="also serve /metrics on this port (off unless given)")
    opt(
        "--shard-uds-path",
        default="/tmp/text-generation-server",
        help_="base path of the shards' sockets ('-RANK' is appended); give each server on a "
        "machine its own",
    )
    opt("--master-addr", default="localhost")
    opt("--master-port", int, 29500)
    opt("--huggingface-hub-cache")
    flag("--disable-custom-kernels")
    opt(
        "--cuda-memory-fraction", float, 1.0,
        "below 1: the share of memory left after the model and warmup that the KV pool takes "
        "(passed as CUDA_MEMORY_FRACTION); 1 keeps the shard's default sizing",
    )
    flag("--json-output")
    opt("--otlp-endpoint", help_="OTLP/gRPC collector for the router's spans; passed to the shards")
    opt("--otlp-service-name", default="text-generation-inference.router")
    opt("--watermark-gamma", float)
    opt("--watermark-delta", float)
    flag("--disable-grammar-support")
    p.add_argument("--env", "-e", action="store_true", help="print the environment and continue")
    opt("--max-client-batch-size", int, 4)
    opt("--usage-stats", default="on", help_="accepted; this launcher never sends usage stats")
    opt("--payload-limit", int, 2_000_000)
    flag("--enable-prefill-logprobs")
    opt(
        "--graceful-termination-timeout",
        int,
        90,
        "seconds in-flight requests may take to finish after SIGTERM/SIGINT (new ones are "
        "refused); then they are cancelled, and shards get as long to exit",
    )
    opt("--api-key", help_="require `Authorization: Bearer KEY` on the generation routes")
    p.add_argument(
        "--cors-allow-origin",
        action="append",
        default=None,
        help="origin allowed by CORS (repeat the flag for several; env CORS_ALLOW_ORIGIN, "
        "comma-separated); default: any origin",
    )
    p.add_argument("-t", dest="graceful_termination_timeout", type=int, help=argparse.SUPPRESS)
    return p


def refused_flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in REFUSED]


def refused_env(env: dict[str, str]) -> list[str]:
    """``NAME=value (--flag): reason`` for each refused flag set through the environment."""
    found = []
    for flag in REFUSED_ENV:
        name = flag.lstrip("-").replace("-", "_").upper()
        value = env.get(name, "")
        if value.strip() and (flag != "--ngrok" or _bool(value)):
            found.append(f"{name}={value!r} (the environment form of {flag}): {REFUSED[flag]}")
    return found


def parse_args(argv: list[str]) -> LauncherArgs:
    """Parse ``argv``; raises RefusedFlag for unsupported TGI flags (as flags or environment
    variables) or invalid combinations."""
    refused = refused_flags(argv)
    if refused:
        lines = [f"{flag}: {REFUSED[flag]}" for flag in dict.fromkeys(refused)]
        raise RefusedFlag("tgi-npu-launcher does not support " + "; ".join(lines))
    from_env = refused_env(dict(os.environ))
    if from_env:
        raise RefusedFlag(
            "tgi-npu-launcher does not support " + "; ".join(from_env) + ". Unset the variable"
        )
    ns = vars(build_parser().parse_args(argv))
    origins = ns["cors_allow_origin"]
    if origins is None:
        origins = [o for o in os.environ.get("CORS_ALLOW_ORIGIN", "").split(",") if o.strip()]
    ns["cors_allow_origin"] = tuple(o.strip() for o in origins)
    ns["api_key"] = ns["api_key"] or None
    max_input_length = ns.pop("max_input_length")
    if max_input_length is not None:
        if ns["max_input_tokens"] is not None:
            raise RefusedFlag(
                f"Both `max_input_tokens` ({ns['max_input_tokens']}) and `max_input_length` "
                f"({max_input_length}) are set. Please define only `max_input_tokens` as "
                "`max_input_length is deprecated for naming consistency."
            )
        ns["max_input_tokens"] = max_input_length
    for name in ("sharded",):
        if isinstance(ns[name], str):
            ns[name] = _bool(ns[name])
    args = LauncherArgs(**ns)
    _check(args)
    return args


def _check(a: LauncherArgs) -> None:
    if a.quantize is not None and a.quantize not in QUANTIZE:  # e.g. QUANTIZE=awq in the environment
        raise RefusedFlag(
            f"--quantize {a.quantize}: the shards serve {', '.join(QUANTIZE)} (int8); "
            "other methods are not supported"
        )
    if a.max_best_of != 1:
        raise RefusedFlag(
            f"--max-best-of {a.max_best_of}: only best_of=1 is supported by tgi-npu-launcher"
        )
    if a.validation_workers < 1:
        raise RefusedFlag("`validation_workers` must be > 0")
    if a.cuda_graphs is not None and a.cuda_graphs.replace(" ", "") not in ("", "0"):
        raise RefusedFlag(
            f"--cuda-graphs {a.cuda_graphs} (or CUDA_GRAPHS): the shards capture no graphs (CPU "
            "and NPU run eagerly); drop the flag or pass 0"
        )
    if not 0.0 < a.cuda_memory_fraction <= 1.0:
        raise RefusedFlag(f"--cuda-memory-fraction {a.cuda_memory_fraction}: must be in (0, 1]")
    if a.max_total_tokens is not None and a.max_total_tokens < 2:
        raise RefusedFlag(f"--max-total-tokens {a.max_total_tokens}: must be at least 2")
    if (
        a.max_input_tokens is not None
        and a.max_total_tokens is not None
        and a.max_input_tokens >= a.max_total_tokens
    ):
        raise RefusedFlag(
            f"`max_input_tokens`({a.max_input_tokens}) must be < `max_total_tokens`({a.max_total_tokens})"
        )
    if a.max_batch_total_tokens is not None:
        if a.max_total_tokens is not None and a.max_total_tokens > a.max_batch_total_tokens:
            raise RefusedFlag(
                "`max_total_tokens` must be <= `max_batch_total_tokens`. "
                f"Given: {a.max_total_tokens} and {a.max_batch_total_tokens}"
            )
        if (
            a.max_batch_prefill_tokens is not None
            and a.max_batch_prefill_tokens > a.max_batch_total_tokens
        ):
            raise RefusedFlag(
                "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. "
                f"Given: {a.max_batch_prefill_tokens} and {a.max_batch_total_tokens}"
            )
    if a.max_concurrent_requests < 1:
        raise RefusedFlag("--max-concurrent-requests must be >= 1")
    if not 0.0 <= a.waiting_served_ratio:
        raise RefusedFlag("--waiting-served-ratio must be >= 0")
    if a.graceful_termination_timeout < 0:
        raise RefusedFlag("--graceful-termination-timeout must be >= 0 seconds")


def find_num_shards(sharded: bool | None, num_shard: int | None) -> int:
    """TGI's ``find_num_shards`` minus device counting: on Ascend/CPU pass --num-shard."""
    if sharded is True:
        if num_shard is None:
            raise RefusedFlag(
                "--sharded true needs --num-shard N (devices are not counted on NPU/CPU hosts)"
            )
        if num_shard <= 1:
            raise RefusedFlag("`sharded` is true but `num_shard` <= 1")
        return num_shard
    if sharded is False:
        if num_shard is not None and num_shard > 1:
            raise RefusedFlag("`sharded` is false but `num_shard` > 1")
        return 1
    n = 1 if num_shard is None else num_shard
    if n < 1:
        raise RefusedFlag("`num_shard` cannot be < 1")
    return n
