"""Router-side tracing: a span per HTTP request (child of the caller's ``traceparent``), a span
per batch RPC, and that span's ``traceparent`` in the shard's gRPC metadata."""

from __future__ import annotations

from harness import fake_router, run
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def test_request_and_batch_spans_and_traceparent_to_the_shard(hf_tokenizer):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def scenario():
        async with fake_router(hf_tokenizer, tracer_provider=provider) as h:
            body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 3}}
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            async with h.session.post(h.url + "/generate", json=body, headers=headers) as resp:
                assert resp.status == 200
            await h.idle()
            return list(h.shards[0].metadata)

    metadata = run(scenario())
    spans = exporter.get_finished_spans()
    request = [s for s in spans if s.name == "generate"]
    assert len(request) == 1
    assert format(request[0].context.trace_id, "032x") == TRACE_ID
    assert format(request[0].parent.span_id, "016x") == PARENT_ID
    assert request[0].attributes["http.status_code"] == 200
    prefill = [s for s in spans if s.name == "prefill"]
    decode = [s for s in spans if s.name == "decode"]
    assert len(prefill) == 1 and len(decode) == 2 and prefill[0].attributes["batch.size"] == 1
    # the batch span is a root that links to the request span it serves
    assert prefill[0].parent is None
    assert [link.context.span_id for link in prefill[0].links] == [request[0].context.span_id]
    sent = dict(metadata)["Prefill"]["traceparent"]  # 00-TRACE-SPAN-FLAGS
    ctx = prefill[0].context
    assert sent.startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
    decode_sent = [m["traceparent"][:52] for name, m in metadata if name == "Decode"]
    assert decode_sent == [f"00-{s.context.trace_id:032x}-{s.context.span_id:016x}" for s in decode]


def test_no_tracing_sends_no_traceparent(hf_tokenizer):
    async def scenario():
        async with fake_router(hf_tokenizer) as h:
            body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 2}}
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            async with h.session.post(h.url + "/generate", json=body, headers=headers) as resp:
                assert resp.status == 200
            assert all("traceparent" not in m for _, m in h.shards[0].metadata)

    run(scenario())


def test_otlp_endpoint_exports_the_router_spans(hf_tokenizer):
    """--otlp-endpoint: spans reach an OTLP/gRPC collector under --otlp-service-name, flushed
    when the router stops."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()

    async def scenario():
        async with fake_router(
            hf_tokenizer,
            otlp_endpoint=f"http://127.0.0.1:{port}",
            otlp_service_name="router-test",
        ) as h:
            body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 2}}
            status, _ = await h.post("/generate", body)
            assert status == 200
            await h.idle()

    try:
        run(scenario())
    finally:
        collector.stop(None)
    names = {}
    for req in received:
        for rs in req.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    names[span.name] = attrs["service.name"]
    assert names.get("generate") == "router-test" and names.get("prefill") == "router-test", names
