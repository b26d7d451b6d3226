"""The launcher flags the HTTP router reads reach its settings (cli.settings_from)."""

from __future__ import annotations

from tgi_npu_backend.launcher.args import parse_args
from tgi_npu_backend.launcher.cli import settings_from


def test_grammar_and_tracing_flags_reach_the_router(monkeypatch):
    for name in ("DISABLE_GRAMMAR_SUPPORT", "OTLP_ENDPOINT", "OTLP_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    default = settings_from(parse_args([]))
    assert not default.disable_grammar_support and default.otlp_endpoint is None
    assert default.otlp_service_name == "text-generation-inference.router"
    s = settings_from(
        parse_args(
            ["--disable-grammar-support", "--otlp-endpoint", "http://collector:4317",
             "--otlp-service-name", "router-a"]
        )
    )  # fmt: skip
    assert s.disable_grammar_support
    assert (s.otlp_endpoint, s.otlp_service_name) == ("http://collector:4317", "router-a")


def test_info_names_the_quantization_and_chunking(monkeypatch):
    from tgi_npu_backend.launcher.router import info_json
    from tgi_npu_backend.launcher.schemas import Info
    from tgi_npu_backend.launcher.warmup import Limits

    monkeypatch.delenv("QUANTIZE", raising=False)
    limits = Limits(100, 200, 256, 4096)
    body = info_json(settings_from(parse_args(["--quantize", "eetq"])), limits, True)
    assert body["quantize"] == "eetq" and body["prefill_chunking"] is True
    Info.model_validate(body)  # the documented /info shape
    body = info_json(settings_from(parse_args([])), limits)
    assert body["quantize"] is None and body["prefill_chunking"] is False
