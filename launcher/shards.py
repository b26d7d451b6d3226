"""Shard processes: ``download-weights``, then one ``text-generation-server serve`` per rank with
the environment and command line of TGI's launcher (PROTOCOL.md c.3-c.6). Ready = the socket file
``{uds_path}-{rank}`` exists; a shard that exits is a failure, reported with its stderr."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
from collections import deque
from dataclasses import dataclass, field

from .args import LauncherArgs
from .errors import LauncherError
from .logs import emit_shard_line

log = logging.getLogger(__name__)
shard_log = logging.getLogger("shard")

PROGRAM = "text-generation-server"
STDERR_LINES = 2000


def hf_transfer_env(env: dict[str, str]) -> str | None:
    # NOTE: TGI defaults HF_HUB_ENABLE_HF_TRANSFER to 1 because its image ships hf_transfer; with
    # the variable set and the package missing, hub downloads fail, so only default it when present.
    if "HF_HUB_ENABLE_HF_TRANSFER" in env:
        return env["HF_HUB_ENABLE_HF_TRANSFER"]
    return "1" if importlib.util.find_spec("hf_transfer") is not None else None


def base_env(args: LauncherArgs) -> dict[str, str]:
    """The launcher's environment minus LOG_LEVEL, plus what both download and serve get."""
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transfer = hf_transfer_env(env)
    if transfer is not None:
        env["HF_HUB_ENABLE_HF_TRANSFER"] = transfer
    if "HF_API_TOKEN" in env:
        env["HF_TOKEN"] = env["HF_API_TOKEN"]
    if args.huggingface_hub_cache:
        env["HUGGINGFACE_HUB_CACHE"] = args.huggingface_hub_cache
    return env


def shard_env(
    args: LauncherArgs, rank: int, world_size: int, attention: str, prefix_caching: str
) -> dict[str, str]:
    env = base_env(args)
    env.update(
        PREFIX_CACHING=prefix_caching,
        ATTENTION=attention,
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR=args.master_addr,
        MASTER_PORT=str(args.master_port),
        TORCH_NCCL_AVOID_RECORD_STREAMS="1",
        CUDA_MEMORY_FRACTION=str(args.cuda_memory_fraction),
        SAFETENSORS_FAST_GPU="1",
    )
    if args.max_batch_total_tokens is not None:
        env["TGI_NPU_KV_CACHE_TOKENS"] = str(args.max_batch_total_tokens)
    if args.max_total_tokens is not None:
        env["MAX_TOTAL_TOKENS"] = str(args.max_total_tokens)
    if args.max_batch_size is not None:
        env["MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.enable_prefill_logprobs:
        env["REQUEST_LOGPROBS"] = "1"
    # NOTE: no CUDA_GRAPHS (TGI sets 1,2,4,8,16,32): the shards capture no graphs, and --cuda-graphs
    # other than 0 is refused; ROPE_SCALING/ROPE_FACTOR and WEIGHTS_CACHE_OVERRIDE are refused too.
    if args.disable_custom_kernels:
        env["DISABLE_CUSTOM_KERNELS"] = "True"
    if args.watermark_gamma is not None:
        env["WATERMARK_GAMMA"] = str(args.watermark_gamma)
    if args.watermark_delta is not None:
        env["WATERMARK_DELTA"] = str(args.watermark_delta)
    return env


def download_command(args: LauncherArgs) -> list[str]:
    cmd = [
        PROGRAM,
        "download-weights",
        args.model_id,
        "--extension",
        ".safetensors",
        "--logger-level",
        "INFO",
        "--json-output",
        "--merge-lora",
    ]
    if args.revision:
        cmd += ["--revision", args.revision]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def serve_command(args: LauncherArgs, world_size: int, log_level: str) -> list[str]:
    cmd = [
        PROGRAM,
        "serve",
        args.model_id,
        "--uds-path",
        args.shard_uds_path,
        "--logger-level",
        log_level,
        "--json-output",
    ]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    if world_size > 1:
        cmd.append("--sharded")
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.revision:
        cmd += ["--revision", args.revision]
    if args.otlp_endpoint:
        cmd += ["--otlp-endpoint", args.otlp_endpoint]
    cmd += ["--otlp-service-name", args.otlp_service_name]
    if args.max_input_tokens is not None:
        cmd += ["--max-input-tokens", str(args.max_input_tokens)]
    return cmd


@dataclass
class Shard:
    rank: int
    socket: str
    process: asyncio.subprocess.Process
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_LINES))
    readers: list[asyncio.Task] = field(default_factory=list)

    def stderr_text(self) -> str:
        return "".join(self.stderr)


async def _pump(stream: asyncio.StreamReader, sink) -> None:
    while line := await stream.readline():
        sink(line.decode("utf-8", "replace"))


async def _spawn(cmd: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *cmd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise LauncherError(
            f"`{cmd[0]}` was not found on PATH: install tgi-npu-backend (pip install -e .) "
            "in the environment that runs the launcher"
        ) from None


async def terminate(process: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    if process.returncode is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except asyncio.TimeoutError:
        log.warning(f"process {process.pid} did not stop within {timeout}s: killing it")
        try:
            process.kill()
        except ProcessLookupError:
            pass
        await process.wait()


class ShardManager:
    def __init__(
        self,
        args: LauncherArgs,
        world_size: int,
        attention: str,
        prefix_caching: str,
        log_level: str,
    ):
        self.args = args
        self.world_size = world_size
        self.attention = attention
        self.prefix_caching = prefix_caching
        self.log_level = log_level
        self.shards: list[Shard] = []
        self._download: asyncio.subprocess.Process | None = None

    async def download_weights(self) -> None:
        log.info(f"Starting check and download process for {self.args.model_id}")
        cmd = download_command(self.args)
        self._download = proc = await _spawn(cmd, base_env(self.args))
        stderr: deque[str] = deque(maxlen=STDERR_LINES)
        readers = [
            asyncio.create_task(
                _pump(proc.stdout, lambda line: emit_shard_line(line, -1, shard_log))
            ),
            asyncio.create_task(_pump(proc.stderr, stderr.append)),
        ]
        try:
            code = await proc.wait()
            await asyncio.gather(*readers)
        finally:
            if proc.returncode is None:
                await terminate(proc, 10)
            self._download = None
        if code != 0:
            raise LauncherError(
                f"Download encountered an error (exit code {code}):\n{''.join(stderr)}".rstrip()
            )
        log.info(f"Successfully downloaded weights for {self.args.model_id}")

    async def start(self) -> None:
        """Spawn every rank, then wait for all sockets; a shard exiting first is an error."""
        cmd = serve_command(self.args, self.world_size, self.log_level)
        for rank in range(self.world_size):
            socket = f"{self.args.shard_uds_path}-{rank}"
            if os.path.exists(socket):
                os.remove(socket)  # stale socket of an earlier run
            env = shard_env(self.args, rank, self.world_size, self.attention, self.prefix_caching)
            log.info(f"Starting shard {rank}")
            process = await _spawn(cmd, env)
            shard = Shard(rank, socket, process)
            shard.readers = [
                asyncio.create_task(
                    _pump(process.stdout, lambda line, r=rank: emit_shard_line(line, r, shard_log))
                ),
                asyncio.create_task(_pump(process.stderr, shard.stderr.append)),
            ]
            self.shards.append(shard)
        polls = 0
        while not all(os.path.exists(s.socket) for s in self.shards):
            failed = self.exited()
            if failed is not None:
                raise self.failure(failed)
            await asyncio.sleep(0.1)
            polls += 1
            if polls % 100 == 0:  # every ~10 s, as the Rust launcher does
                log.info("Waiting for shards to be ready...")
        for shard in self.shards:
            log.info(f"Shard {shard.rank} ready")

    def exited(self) -> Shard | None:
        return next((s for s in self.shards if s.process.returncode is not None), None)

    def failure(self, shard: Shard) -> LauncherError:
        return LauncherError(
            f"Shard {shard.rank} exited with code {shard.process.returncode}; its stderr:\n"
            f"{shard.stderr_text()}".rstrip()
        )

    async def wait_for_exit(self) -> Shard:
        """Return the first shard that exits (for the launcher's watch loop)."""
        waits = {asyncio.ensure_future(s.process.wait()): s for s in self.shards}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        shard = waits[next(iter(done))]
        await asyncio.gather(*shard.readers, return_exceptions=True)  # collect its last stderr
        return shard

    async def stop(self, timeout: float) -> None:
        if self._download is not None:
            await terminate(self._download, 10)
        await asyncio.gather(*(terminate(s.process, timeout) for s in self.shards))
        for shard in self.shards:
            await asyncio.gather(*shard.readers, return_exceptions=True)
            if os.path.exists(shard.socket) and shard.process.returncode is not None:
                try:
                    os.remove(shard.socket)
                except OSError:
                    pass
        if self.shards:
            log.info("Shards stopped")
