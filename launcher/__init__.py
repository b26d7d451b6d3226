"""Python stand-in for TGI's ``text-generation-launcher`` and v3 router.

Starts the shards (``text-generation-server serve``), drives them over the v3 gRPC protocol as the
Rust router does, and serves TGI's HTTP API. Module map (data flows top to bottom):

- ``cli``         entry point ``tgi-npu-launcher``: parse flags, start, serve, stop
- ``args``        TGI launcher flags (names, defaults, env fallbacks); unsupported ones refused
- ``shards``      ``download-weights``, one ``serve`` process per rank, readiness, teardown
- ``logs``        launcher logging and re-emission of the shards' JSON log lines
- ``model_config`` what config.json says: ATTENTION/PREFIX_CACHING hints, prefill default
- ``router``      assembles queue, batching task, validation and HTTP once the shards are warm
- ``client``      grpc.aio clients: one per shard, and the sharded fan-out
- ``warmup``      the router's warmup batch and the limit checks that follow it
- ``http_api`` / ``openai_api`` / ``completions`` / ``schemas``   TGI's HTTP routes, JSON shapes
- ``infer``       concurrency limit, validation, scheduling, collecting a request's events
- ``validation`` / ``tokenizer``   TGI's request validation with the model's own tokenizer
- ``batch_queue`` / ``allocator`` / ``scheduler``   the batching loop, KV blocks and slots
- ``protocol``    conversions between router types and protobuf messages
- ``entities`` / ``errors`` / ``metrics``   shared dataclasses, HTTP-mapped errors, Prometheus text
"""
