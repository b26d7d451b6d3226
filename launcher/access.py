"""Who may call what: ``--api-key`` and ``--cors-allow-origin`` as TGI's router applies them
(``router/src/server.rs``).

* API key: the generation routes (``POST /``, ``/generate``, ``/generate_stream``,
  ``/v1/chat/completions``, ``/v1/completions``, ``/tokenize``, ``/invocations``) need
  ``Authorization: Bearer <key>`` (compared case-insensitively, as TGI does); health, info,
  metrics, model listing, ``/chat_tokenize`` and the API docs stay open. A missing or wrong key is 401.
* CORS: the outermost layer; ``GET``/``POST`` from any origin unless ``--cors-allow-origin``
  lists some (then only those get ``access-control-allow-origin``). Preflight ``OPTIONS`` is
  answered before the key is checked, as browsers send no credentials with it.
"""

from __future__ import annotations

import hmac

from aiohttp import web

PROTECTED = frozenset(
    ("POST", path)
    for path in (
        "/",
        "/generate",
        "/generate_stream",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/invocations",
    )
)
VARY = "origin, access-control-request-method, access-control-request-headers"


def auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".lower().encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if (request.method, request.path) in PROTECTED:
            given = request.headers.get("Authorization", "").lower().encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {
                        "error": "Unauthorized: send the header `Authorization: Bearer <key>` "
                        "with the server's --api-key",
                        "error_type": "unauthorized",
                    },
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return auth


def add_cors(
    app: web.Application, allow_origins: tuple[str, ...], allow_authorization: bool
) -> None:
    """CORS on every response of ``app``; ``allow_origins`` empty: any origin (``*``), TGI's
    default. Headers are added when a response is prepared, so SSE streams carry them too."""
    allowed = frozenset(allow_origins)
    allow_headers = "content-type, authorization" if allow_authorization else "content-type"

    def allow_origin(request: web.Request) -> str | None:
        if not allowed:
            return "*"
        origin = request.headers.get("Origin")
        return origin if origin in allowed else None

    @web.middleware
    async def preflight(request: web.Request, handler):
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(
                status=200,
                headers={
                    "Access-Control-Allow-Methods": "GET,POST",
                    "Access-Control-Allow-Headers": allow_headers,
                },
            )
        return await handler(request)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = allow_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = VARY

    app.middlewares.insert(0, preflight)  # outermost: before the API key is checked
    app.on_response_prepare.append(on_prepare)
