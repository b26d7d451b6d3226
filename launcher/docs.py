"""``GET /api-doc/openapi.json`` (the OpenAPI document, ``openapi``) and ``GET /docs``: Swagger UI
from the ``swagger-ui-bundle`` package, served from this process (no CDN: it works offline).
Without that package ``/docs`` is a plain page listing the routes, saying what to install."""

from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

from .openapi import openapi_document
from .version import VERSION

SPEC_PATH = "/api-doc/openapi.json"
ASSETS = "/docs/assets"
DOC = web.AppKey("openapi_document", dict)

SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Text Generation Inference API</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "{spec}", dom_id: "#swagger-ui"}});</script>
</body></html>
"""


def swagger_ui_dir() -> Path | None:
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)


def plain_page(doc: dict) -> str:
    """The routes and their summaries, for when Swagger UI is not installed."""
    rows = "".join(
        f"<li><code>{method.upper()} {html.escape(path)}</code>: "
        f"{html.escape(op.get('summary', ''))}</li>"
        for path, item in doc["paths"].items()
        for method, op in item.items()
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>Text Generation Inference API</title></head><body>"
        "<h1>Text Generation Inference API</h1>"
        "<p>Swagger UI is not installed here (<code>pip install swagger-ui-bundle</code>); "
        f'the OpenAPI document is at <a href="{SPEC_PATH}">{SPEC_PATH}</a>.</p>'
        f"<ul>{rows}</ul></body></html>"
    )


async def spec(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOC])


def add_routes(app: web.Application) -> None:
    app[DOC] = openapi_document(VERSION)
    app.router.add_get(SPEC_PATH, spec)
    ui = swagger_ui_dir()
    if ui is not None:
        page = SWAGGER_PAGE.format(assets=ASSETS, spec=SPEC_PATH)
        app.router.add_static(ASSETS, ui)
    else:
        page = plain_page(app[DOC])

    async def docs(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    app.router.add_get("/docs", docs)
