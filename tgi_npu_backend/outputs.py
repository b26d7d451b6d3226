"""What a generation step returns, as plain dataclasses; ``to_pb`` is the only protobuf contact."""

from __future__ import annotations

from dataclasses import dataclass, field

from tgi_npu_backend.pb import generate_pb2 as pb

from .stopping import FinishReason


@dataclass
class Tokens:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    is_special: list[bool] = field(default_factory=list)

    def to_pb(self) -> pb.Tokens:
        return pb.Tokens(ids=self.ids, logprobs=self.logprobs, texts=self.texts, is_special=self.is_special)


@dataclass
class GeneratedText:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None  # only for sampled requests, as TGI

    def to_pb(self) -> pb.GeneratedText:
        out = pb.GeneratedText(
            text=self.text, generated_tokens=self.generated_tokens, finish_reason=int(self.finish_reason)
        )
        if self.seed is not None:
            out.seed = self.seed
        return out


@dataclass
class Generation:
    request_id: int
    tokens: Tokens  # always present: the router requires it
    prefill_tokens: Tokens | None = None  # only on the first generation, only when asked
    generated_text: GeneratedText | None = None  # present iff the request finished this step
    top_tokens: list[Tokens] = field(default_factory=list)  # one entry per token when top_n > 0

    def to_pb(self) -> pb.Generation:
        out = pb.Generation(
            request_id=self.request_id,
            tokens=self.tokens.to_pb(),
            top_tokens=[t.to_pb() for t in self.top_tokens],
        )
        if self.prefill_tokens is not None:
            out.prefill_tokens.CopyFrom(self.prefill_tokens.to_pb())
        if self.generated_text is not None:
            out.generated_text.CopyFrom(self.generated_text.to_pb())
        return out


@dataclass
class StepOutput:
    """Result of a Prefill or Decode RPC (times in ns, as TGI reports them)."""

    generations: list[Generation]
    batch: pb.CachedBatch | None
    forward_ns: int
    decode_ns: int
    total_ns: int
    concat_ns: int | None = None

    def to_pb(self, response_cls):
        out = response_cls(
            generations=[g.to_pb() for g in self.generations],
            forward_ns=self.forward_ns,
            decode_ns=self.decode_ns,
            total_ns=self.total_ns,
        )
        if self.batch is not None:
            out.batch.CopyFrom(self.batch)
        if self.concat_ns is not None:
            out.concat_ns = self.concat_ns
        return out
