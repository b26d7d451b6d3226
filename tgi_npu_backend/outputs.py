"""What the shard answers, as plain dataclasses (``wire.py`` turns them into protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .stopping import FinishReason


@dataclass(slots=True)
class Tokens:
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    is_special: list[bool] = field(default_factory=list)



@dataclass(slots=True)
class GeneratedText:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int | None  # only for sampled requests, as TGI



@dataclass(slots=True)
class Generation:
    request_id: int
    tokens: Tokens  # always present: the router requires it
    prefill_tokens: Tokens | None = None  # only on the first generation, only when asked
    generated_text: GeneratedText | None = None  # present iff the request finished this step
    top_tokens: list[Tokens] = field(default_factory=list)  # one entry per token when top_n > 0



@dataclass(frozen=True)
class Info:
    """The shard's ``InfoResponse``."""

    dtype: str
    device_type: str
    support_chunking: bool
    use_prefix_caching: bool
    attention_impl: str
    block_size: int
    requires_padding: bool = False
    speculate: int = 0


@dataclass(frozen=True)
class CachedBatch:
    """What the router learns about a batch the shard keeps (``CachedBatch``)."""

    id: int
    request_ids: list[int]
    size: int  # includes just-finished requests (the router filters them)
    max_tokens: int  # KV slots the batch's blocks hold
    current_tokens: int  # tokens of the batch's next forward pass


@dataclass
class StepOutput:
    """Result of a Prefill or Decode RPC (times in ns, as TGI reports them)."""

    generations: list[Generation]
    batch: CachedBatch | None
    forward_ns: int
    decode_ns: int
    total_ns: int
    concat_ns: int | None = None

