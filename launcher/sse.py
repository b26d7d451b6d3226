"""Server-sent events with keep-alive comments (axum's ``Sse::keep_alive(KeepAlive::default())``
in TGI: a ``:`` comment line after 15 s without an event, so proxies keep a long stream open)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

KEEP_ALIVE_S = 15.0  # axum's KeepAlive::default() interval
KEEP_ALIVE = b":\n\n"  # an SSE comment: clients ignore it


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()


class SseStream:
    """One SSE response; ``send`` writes a ``data:`` event, a background task writes a keep-alive
    comment whenever ``interval`` seconds pass without one. ``close`` stops the task."""

    def __init__(self, resp: web.StreamResponse, interval: float) -> None:
        self.resp = resp
        self.interval = interval
        self._lock = asyncio.Lock()
        self._last = time.monotonic()
        self._task: asyncio.Task | None = None

    @classmethod
    async def open(
        cls, request: web.Request, headers: dict[str, str], interval: float = KEEP_ALIVE_S
    ) -> SseStream:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **headers,
            }
        )
        await resp.prepare(request)
        stream = cls(resp, interval)
        if interval > 0:
            stream._task = asyncio.create_task(stream._keep_alive())
        return stream

    async def _write(self, payload: bytes) -> None:
        async with self._lock:
            await self.resp.write(payload)
            self._last = time.monotonic()

    async def send(self, data: Any) -> None:
        payload = data if isinstance(data, bytes) else dumps(data)
        await self._write(b"data: " + payload + b"\n\n")

    async def _keep_alive(self) -> None:
        try:
            while True:
                await asyncio.sleep(max(self._last + self.interval - time.monotonic(), 0.0))
                if time.monotonic() - self._last >= self.interval:
                    await self._write(KEEP_ALIVE)
        except (ConnectionError, RuntimeError):  # the client left; the stream ends elsewhere
            return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
