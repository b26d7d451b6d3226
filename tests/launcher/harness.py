"""Test harness: a real Router (HTTP + batching task) over in-process fake shards."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import aiohttp
from fake_shard import FakeShard, start_fake_shards
from tgi_npu_backend.launcher.client import ShardedClient
from tgi_npu_backend.launcher.router import Router, RouterSettings
from tgi_npu_backend.launcher.tokenizer import Tokenizer
from tgi_npu_backend.launcher.warmup import connect_and_warmup


@dataclass
class Harness:
    router: Router
    shards: list[FakeShard]
    session: aiohttp.ClientSession
    url: str

    async def post(self, path: str, body) -> tuple[int, object]:
        async with self.session.post(self.url + path, json=body) as resp:
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, await resp.text()

    async def sse(self, path: str, body) -> tuple[int, list]:
        """POST and collect the ``data:`` payloads (JSON-decoded, except ``[DONE]``)."""
        import json

        async with self.session.post(self.url + path, json=body) as resp:
            if resp.status != 200:
                return resp.status, [await resp.json(content_type=None)]
            events = []
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    payload = line[len("data:") :].strip()
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
            return resp.status, events

    def calls(self, name: str) -> list:
        return [arg for n, arg in self.shards[0].calls if n == name]

    async def idle(self, timeout: float = 5.0) -> None:
        """Wait until the batching task has nothing running and the queue is empty."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.router.scheduler._live or len(self.router.queue):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("router did not become idle")
            await asyncio.sleep(0.01)


@asynccontextmanager
async def fake_router(
    hf_tokenizer,
    *,
    world_size: int = 1,
    max_input_tokens: int | None = 64,
    max_total_tokens: int | None = 128,
    max_batch_prefill_tokens: int = 256,
    max_batch_total_tokens: int | None = None,
    shard_kwargs: dict | None = None,
    tracer_provider=None,
    **settings,
) -> AsyncIterator[Harness]:
    tmp = tempfile.mkdtemp(prefix="fk")  # short: Unix socket paths are <= 107 bytes
    uds = f"{tmp}/s"
    shards, servers = await start_fake_shards(hf_tokenizer, uds, world_size, **(shard_kwargs or {}))
    client = await ShardedClient.connect(f"{uds}-0")
    info, limits = await connect_and_warmup(
        client,
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        max_batch_prefill_tokens=max_batch_prefill_tokens,
        max_batch_total_tokens=max_batch_total_tokens,
        max_batch_size=settings.get("max_batch_size"),
    )
    base = RouterSettings(model_id="fake/bloom", hostname="127.0.0.1", port=0)
    router = await Router.start(
        client,
        info,
        limits,
        replace(base, **settings),
        Tokenizer(hf_tokenizer),
        tracer_provider=tracer_provider,
    )
    session = aiohttp.ClientSession()
    try:
        yield Harness(router, shards, session, f"http://127.0.0.1:{router.port}")
    finally:
        await session.close()
        await router.stop()
        for server in servers:
            await server.stop(0)
        shutil.rmtree(tmp, ignore_errors=True)


def run(coro):
    return asyncio.run(coro)
