"""``POST /invocations`` (SageMaker), as TGI routes it (``router/src/sagemaker.rs``): the body is
a ``/`` generate request (``inputs``), a chat request (``messages``) or a completion request
(``prompt``), tried in that order, and is answered as that route answers."""

from __future__ import annotations

from aiohttp import web

from .completions import completions_body
from .errors import ValidationError
from .http_api import compat_generate_body, read_json
from .openai_api import chat_body
from .wire import PREFIX

NO_VARIANT = f"{PREFIX}: data did not match any variant of untagged enum SagemakerRequest"


async def invocations(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if isinstance(body, dict):
        # NOTE: serde's untagged enum tries each shape; the key each one requires decides here,
        # so a malformed body gets that shape's own error instead of "did not match any variant".
        if "inputs" in body:
            return await compat_generate_body(request, body)
        if "messages" in body:
            return await chat_body(request, body)
        if "prompt" in body:
            return await completions_body(request, body)
    raise ValidationError(NO_VARIANT + " (send `inputs`, `messages` or `prompt`)")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/invocations", invocations)
