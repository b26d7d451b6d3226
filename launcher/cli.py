"""``tgi-npu-launcher``: download weights, start the shards, warm them up, serve HTTP; on
SIGTERM/SIGINT stop accepting requests, let in-flight ones finish for up to
``--graceful-termination-timeout`` seconds (a second signal cancels them at once), stop the shards
and exit 0; if a shard exits, tear everything down, print its stderr and exit 1."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import signal
import sys
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from .args import LauncherArgs, RefusedFlag, find_num_shards, parse_args
from .client import ShardedClient
from .errors import ClientError, LauncherError
from .logs import setup_logging, shard_log_level
from .model_config import (
    default_prefill_tokens,
    load_config,
    resolve_attention,
    resolve_quantize,
)
from .router import Router, RouterSettings
from .shards import ShardManager
from .tokenizer import Tokenizer
from .version import VERSION
from .warmup import connect_and_warmup

log = logging.getLogger("tgi_npu_launcher")


class Stopped(Exception):
    """A termination signal arrived while the launcher was starting."""


async def _guard(work: Awaitable, stop: asyncio.Event, manager: ShardManager | None = None):
    """Await ``work`` unless a signal arrives (Stopped) or a shard exits (LauncherError)."""
    task = asyncio.ensure_future(work)
    watchers = {asyncio.ensure_future(stop.wait()): "stop"}
    if manager is not None and manager.shards:
        watchers[asyncio.ensure_future(manager.wait_for_exit())] = "exit"
    try:
        done, _ = await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        watcher = next(iter(done))
        if watchers[watcher] == "stop":
            raise Stopped()
        raise manager.failure(watcher.result())
    finally:
        for w in watchers:
            w.cancel()


def settings_from(args: LauncherArgs) -> RouterSettings:
    return RouterSettings(
        model_id=args.model_id,
        quantize=args.quantize,
        hostname=args.hostname,
        port=args.port,
        prometheus_port=args.prometheus_port,
        max_concurrent_requests=args.max_concurrent_requests,
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_top_n_tokens=args.max_top_n_tokens,
        waiting_served_ratio=args.waiting_served_ratio,
        max_waiting_tokens=args.max_waiting_tokens,
        max_batch_size=args.max_batch_size,
        validation_workers=args.validation_workers,
        max_client_batch_size=args.max_client_batch_size,
        payload_limit=args.payload_limit,
        shutdown_timeout=float(args.graceful_termination_timeout),
        api_key=args.api_key,
        cors_allow_origin=args.cors_allow_origin,
        disable_grammar_support=args.disable_grammar_support,
        otlp_endpoint=args.otlp_endpoint,
        otlp_service_name=args.otlp_service_name,
    )


async def start_router(
    args: LauncherArgs, prefill_tokens: int, stop: asyncio.Event, manager: ShardManager
) -> Router:
    tokenizer_task = asyncio.ensure_future(
        asyncio.to_thread(Tokenizer.load, args.model_id, args.revision, args.trust_remote_code)
    )
    client = await ShardedClient.connect(f"{args.shard_uds_path}-0")
    try:
        info, limits = await _guard(
            connect_and_warmup(
                client,
                max_input_tokens=args.max_input_tokens,
                max_total_tokens=args.max_total_tokens,
                max_batch_prefill_tokens=prefill_tokens,
                max_batch_total_tokens=args.max_batch_total_tokens,
                max_batch_size=args.max_batch_size,
            ),
            stop,
            manager,
        )
        try:
            tokenizer = await tokenizer_task
        except ValueError as err:
            raise LauncherError(str(err)) from None
        return await Router.start(client, info, limits, settings_from(args), tokenizer)
    except BaseException:
        tokenizer_task.cancel()
        await client.close()
        raise


async def launch(args: LauncherArgs) -> int:
    loop = asyncio.get_running_loop()
    # --validation-workers: the threads that tokenize long prompts (Validator, /tokenize)
    loop.set_default_executor(
        ThreadPoolExecutor(args.validation_workers, thread_name_prefix="validation")
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    config = load_config(args.model_id, args.revision, os.environ)
    args = replace(args, quantize=resolve_quantize(config, args.quantize))
    world_size = find_num_shards(args.sharded, args.num_shard)
    attention, prefix_caching = resolve_attention(config, dict(os.environ))
    prefill_tokens = args.max_batch_prefill_tokens
    if prefill_tokens is None:
        prefill_tokens = default_prefill_tokens(config)
        log.info(f"Default `max_batch_prefill_tokens` to {prefill_tokens}")
        if args.max_batch_total_tokens is not None and prefill_tokens > args.max_batch_total_tokens:
            raise LauncherError(
                "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. "
                f"Given: {prefill_tokens} and {args.max_batch_total_tokens}"
            )
    log.info(f"Using attention {attention} - Prefix caching {prefix_caching}")
    if world_size > 1:
        log.info(f"Sharding model on {world_size} processes")

    manager = ShardManager(args, world_size, attention, prefix_caching, shard_log_level())
    router: Router | None = None
    code = 0
    draining = False
    try:
        await _guard(manager.download_weights(), stop)
        await _guard(manager.start(), stop, manager)
        router = await start_router(args, prefill_tokens, stop, manager)
        log.info(f"Connected: serving {args.model_id} on http://{args.hostname}:{router.port}")
        watchers = {
            asyncio.ensure_future(stop.wait()): "stop",
            asyncio.ensure_future(manager.wait_for_exit()): "exit",
            asyncio.ensure_future(_scheduler_crash(router)): "crash",
        }
        done, pending = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()
        first = next(iter(done))
        if watchers[first] == "exit":
            log.error(str(manager.failure(first.result())))
            code = 1
        elif watchers[first] == "crash":
            log.error(f"The batching task crashed: {first.result()!r}")
            code = 1
        else:
            draining = True
            log.info("Received termination signal: draining in-flight requests, then stopping")
    except Stopped:
        log.info("Received termination signal during startup: stopping")
    except (LauncherError, ClientError, RefusedFlag) as err:
        log.error(str(err))
        code = 1
    finally:
        if router is not None:
            await (_drain(router, stop) if draining else router.stop())
        await manager.stop(args.graceful_termination_timeout)
    return code


async def _drain(router: Router, stop: asyncio.Event) -> None:
    """``router.stop(drain=True)``; a second termination signal cancels what is left at once."""
    stop.clear()
    drained = asyncio.ensure_future(router.stop(drain=True))
    again = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({drained, again}, return_when=asyncio.FIRST_COMPLETED)
        if not drained.done():
            log.info("Second termination signal: cancelling in-flight requests")
            await router.scheduler.stop()  # every request fails, so its handler ends
        await drained
    finally:
        again.cancel()


async def _scheduler_crash(router: Router) -> BaseException:
    while router.scheduler.crashed is None:
        await asyncio.sleep(0.5)
    return router.scheduler.crashed


def print_env(args: LauncherArgs) -> None:
    import grpc

    print(
        f"tgi-npu-launcher {VERSION}; Python {platform.python_version()}; grpcio {grpc.__version__}; "
        f"platform {platform.platform()}"
    )
    print(f"args: {args}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except RefusedFlag as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    setup_logging(args.json_output)
    if args.env:
        print_env(args)
    try:
        code = asyncio.run(launch(args))
    except (LauncherError, RefusedFlag) as err:
        log.error(str(err))
        code = 1
    sys.exit(code)
