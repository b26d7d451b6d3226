"""Protobuf in and out of the shard: ``generate.v3`` messages <-> the plain values the generator
takes and returns. Only the servicer (``server.py``) calls this module; nothing behind it sees a
protobuf type.
"""

from __future__ import annotations

from loguru import logger

from tgi_npu_backend.pb import generate_pb2 as pb

from .outputs import CachedBatch, Generation, Info, StepOutput, Tokens
from .request import RequestSpec

GRAMMAR_TYPES = {pb.GRAMMAR_TYPE_NONE: None, pb.GRAMMAR_TYPE_JSON: "json", pb.GRAMMAR_TYPE_REGEX: "regex"}


# ---------------------------------------------------------------------- in
def text_of(request: pb.Request) -> str:
    """Concatenate the text chunks; images are ignored (text-only models)."""
    if request.HasField("input_chunks") and request.input_chunks.chunks:
        texts = []
        for chunk in request.input_chunks.chunks:
            if chunk.WhichOneof("chunk") == "text":
                texts.append(chunk.text)
            else:
                logger.debug(f"request {request.id}: ignoring a non-text input chunk")
        return "".join(texts)
    return request.inputs


def request_spec(r: pb.Request) -> RequestSpec:
    p, s = r.parameters, r.stopping_parameters
    return RequestSpec(
        id=r.id,
        text=text_of(r),
        truncate=r.truncate,
        add_special_tokens=r.add_special_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        typical_p=p.typical_p,
        do_sample=p.do_sample,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        watermark=p.watermark,
        grammar=p.grammar,
        grammar_type=GRAMMAR_TYPES.get(p.grammar_type, "unknown"),
        max_new_tokens=s.max_new_tokens,
        stop_sequences=tuple(s.stop_sequences),
        ignore_eos_token=s.ignore_eos_token,
        prefill_logprobs=r.prefill_logprobs,
        top_n_tokens=r.top_n_tokens,
        blocks=tuple(r.blocks),
        slots=tuple(r.slots),
        cache_len=r.cache_len,
        chunk_len=r.chunk_len if r.HasField("chunk_len") else None,
    )


def batch_requests(batch: pb.Batch) -> list[RequestSpec]:
    return [request_spec(r) for r in batch.requests]


# ---------------------------------------------------------------------- out
def info_pb(info: Info) -> pb.InfoResponse:
    return pb.InfoResponse(
        requires_padding=info.requires_padding,
        dtype=info.dtype,
        device_type=info.device_type,
        speculate=info.speculate,
        support_chunking=info.support_chunking,
        use_prefix_caching=info.use_prefix_caching,
        attention_impl=info.attention_impl,
        block_size=info.block_size,
    )


def cached_batch_pb(batch: CachedBatch) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=batch.id,
        request_ids=batch.request_ids,
        size=batch.size,
        max_tokens=batch.max_tokens,
        current_tokens=batch.current_tokens,
    )


# NOTE: the messages are filled in place (``add()``, ``extend``) rather than built from keyword
# arguments and copied into their parents: for a 32-request DecodeResponse that is 84 against
# 190 us, on every step (benchmarks/bench_host.py's host time per step).
def _fill_tokens(out: pb.Tokens, tokens: Tokens) -> None:
    out.ids.extend(tokens.ids)
    out.logprobs.extend(tokens.logprobs)
    out.texts.extend(tokens.texts)
    out.is_special.extend(tokens.is_special)


def _fill_generation(out: pb.Generation, gen: Generation) -> None:
    out.request_id = gen.request_id
    _fill_tokens(out.tokens, gen.tokens)
    for top in gen.top_tokens:
        _fill_tokens(out.top_tokens.add(), top)
    if gen.prefill_tokens is not None:
        _fill_tokens(out.prefill_tokens, gen.prefill_tokens)
    if gen.generated_text is not None:
        text = gen.generated_text
        out.generated_text.text = text.text
        out.generated_text.generated_tokens = text.generated_tokens
        out.generated_text.finish_reason = int(text.finish_reason)
        if text.seed is not None:
            out.generated_text.seed = text.seed


def step_pb(step: StepOutput, response_cls):
    """A ``PrefillResponse`` or ``DecodeResponse``."""
    out = response_cls(forward_ns=step.forward_ns, decode_ns=step.decode_ns, total_ns=step.total_ns)
    add = out.generations.add
    for gen in step.generations:
        _fill_generation(add(), gen)
    if step.batch is not None:
        out.batch.CopyFrom(cached_batch_pb(step.batch))
    if step.concat_ns is not None:
        out.concat_ns = step.concat_ns
    return out
