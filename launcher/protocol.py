"""Conversions between router types and v3 protobuf messages (the only protobuf users besides
``client`` and ``warmup``)."""

from __future__ import annotations

from tgi_npu_backend.pb import generate_pb2 as pb

from .allocator import BlockAllocation
from .entities import (
    FINISH_REASONS,
    EndEvent,
    Event,
    GeneratedText,
    PrefillEvent,
    PrefillToken,
    Token,
    TokenEvent,
    ValidRequest,
)

U64_MAX = 2**64 - 1
GRAMMAR_TYPES = {"json": pb.GRAMMAR_TYPE_JSON, "regex": pb.GRAMMAR_TYPE_REGEX}


def chooser_pb(
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    typical_p: float = 1.0,
    do_sample: bool = False,
    seed: int = 0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    watermark: bool = False,
    grammar: str = "",
    grammar_type: int = pb.GRAMMAR_TYPE_NONE,
) -> pb.NextTokenChooserParameters:
    """Every ``NextTokenChooserParameters`` the launcher sends is built here (defaults: greedy,
    nothing applied: what the router sends for a request that sets nothing)."""
    return pb.NextTokenChooserParameters(
        temperature=temperature, top_k=top_k, top_p=top_p, typical_p=typical_p,
        do_sample=do_sample, seed=seed, repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty, watermark=watermark, grammar=grammar,
        grammar_type=grammar_type,
    )


def make_request(
    *,
    id: int,
    text: str,
    parameters: pb.NextTokenChooserParameters,
    max_new_tokens: int,
    truncate: int = 0,
    add_special_tokens: bool = True,
    stop_sequences: list[str] | tuple[str, ...] = (),
    ignore_eos_token: bool = False,
    prefill_logprobs: bool = False,
    top_n_tokens: int = 0,
    blocks: list[int] | tuple[int, ...] = (),
    slots: list[int] | tuple[int, ...] = (),
    cache_len: int = 0,
    chunk_len: int | None = None,
    extra_chunks: list[pb.InputChunk] = (),
    inputs: str | None = None,
) -> pb.Request:
    """Every ``Request`` the launcher sends is built here: one text chunk (plus ``extra_chunks``,
    e.g. the warmup's image), ``inputs`` the legacy text field (``text`` unless given)."""
    message = pb.Request(
        id=id,
        inputs=text if inputs is None else inputs,
        input_chunks=pb.Input(chunks=[pb.InputChunk(text=text), *extra_chunks]),
        truncate=truncate,
        add_special_tokens=add_special_tokens,
        prefill_logprobs=prefill_logprobs,
        top_n_tokens=top_n_tokens,
        parameters=parameters,
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=max_new_tokens,
            stop_sequences=list(stop_sequences),
            ignore_eos_token=ignore_eos_token,
        ),
        blocks=list(blocks),
        slots=list(slots),
        cache_len=cache_len,
    )
    if chunk_len is not None:
        message.chunk_len = chunk_len
    return message


def request_to_pb(
    request_id: int,
    req: ValidRequest,
    allocation: BlockAllocation | None,
    chunk_len: int | None = None,
) -> pb.Request:
    """The ``Request`` the v3 router builds in ``queue.rs`` (text-only: one text chunk);
    ``chunk_len``: the prompt tokens of its first pass, when the prefill budget cut it."""
    p = req.parameters
    message = make_request(
        id=request_id,
        text=req.inputs,
        truncate=req.truncate,
        add_special_tokens=req.add_special_tokens,
        prefill_logprobs=req.decoder_input_details,
        top_n_tokens=req.top_n_tokens,
        parameters=chooser_pb(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            do_sample=p.do_sample,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            watermark=p.watermark,
            grammar=p.grammar.value if p.grammar else "",
            grammar_type=GRAMMAR_TYPES[p.grammar.kind] if p.grammar else pb.GRAMMAR_TYPE_NONE,
        ),
        max_new_tokens=req.stopping.max_new_tokens,
        stop_sequences=req.stopping.stop_sequences,
        ignore_eos_token=req.stopping.ignore_eos_token,
        blocks=allocation.blocks if allocation else (),
        slots=allocation.slots if allocation else (),
        cache_len=allocation.prefix_len if allocation else 0,
        chunk_len=chunk_len,
    )
    if req.adapter_id is not None:
        message.adapter_id = req.adapter_id
    return message


def _tokens(tokens: pb.Tokens) -> list[Token]:
    specials = list(tokens.is_special) or [False] * len(tokens.ids)
    return [
        Token(id=i, text=t, logprob=lp, special=s)
        for i, lp, t, s in zip(tokens.ids, tokens.logprobs, tokens.texts, specials)
    ]


def generation_events(gen: pb.Generation, queued: float, start: float) -> tuple[list[Event], bool]:
    """Events for one Generation (``send_responses`` in ``backend.rs``) and whether it ended."""
    events: list[Event] = []
    if gen.HasField("prefill_tokens"):
        p = gen.prefill_tokens
        events.append(
            PrefillEvent([PrefillToken(i, t, lp) for i, lp, t in zip(p.ids, p.logprobs, p.texts)])
        )
    tokens = _tokens(gen.tokens)
    top = [_tokens(t) for t in gen.top_tokens]
    finished = gen.HasField("generated_text")
    for i, token in enumerate(tokens):
        top_tokens = top[i] if i < len(top) else []
        if finished and i == len(tokens) - 1:
            g = gen.generated_text
            generated = GeneratedText(
                text=g.text,
                generated_tokens=g.generated_tokens,
                finish_reason=FINISH_REASONS[g.finish_reason],
                seed=g.seed if g.HasField("seed") else None,
            )
            events.append(EndEvent(token, top_tokens, generated, queued=queued, start=start))
        else:
            events.append(TokenEvent(token, top_tokens))
    return events, finished
