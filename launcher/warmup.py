"""The router's warmup batch and the limit checks around it (TGI ``backends/v3/src/lib.rs``,
``main.rs``, ``client/grpc_client.rs``)."""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

from tgi_npu_backend.pb import generate_pb2 as pb

from .client import ShardedClient, WarmupAnswer
from .errors import LauncherError
from .protocol import chooser_pb, make_request

log = logging.getLogger(__name__)

# The tiny PNG the v3 router sends with its first warmup request (``client/mod.rs``).
WARMUP_IMAGE_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABQAAAAUCAIAAAAC64paAAABg2lDQ1BJQ0MgcHJvZmlsZQAAKJF9kT1Iw0AcxV/TSotUROx"
    "QxCFDdbKLijjWKhShQqgVWnUwufQLmrQkKS6OgmvBwY/FqoOLs64OroIg+AHi7OCk6CIl/i8ptIjx4Lgf7+497t4BQqvKNDOQ"
    "ADTdMjKppJjLr4rBVwQQwhAERGVm1uckKQ3P8XUPH1/v4jzL+9yfY0AtmAzwicQJVjcs4g3imU2rznmfOMLKskp8Tjxh0AWJH"
    "7muuPzGueSwwDMjRjYzTxwhFks9rPQwKxsa8TRxTNV0yhdyLquctzhr1Qbr3JO/MFzQV5a5TnMUKSxiCRJEKGiggiosxGnVST"
    "GRof2kh3/E8UvkUshVASPHAmrQIDt+8D/43a1ZnJp0k8JJoO/Ftj/GgOAu0G7a9vexbbdPAP8zcKV3/bUWMPtJerOrxY6AwW3"
    "g4rqrKXvA5Q4QfarLhuxIfppCsQi8n9E35YHhW6B/ze2ts4/TByBLXaVvgINDYLxE2ese7w719vbvmU5/PycecohsjayNAAAA"
    "CXBIWXMAAC4jAAAuIwF4pT92AAAAB3RJTUUH6AQIEQMnlTSSjwAAABl0RVh0Q29tbWVudABDcmVhdGVkIHdpdGggR0lNUFeBD"
    "hcAAAASSURBVDjLY2AYBaNgFIyCoQsABMQAAeRw1DoAAAAASUVORK5CYII="
)


@dataclass(frozen=True)
class Limits:
    """Token limits in force after warmup."""

    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int


def build_warmup_request(
    max_input_tokens: int | None,
    max_prefill_tokens: int,
    max_total_tokens: int | None,
    max_batch_size: int | None,
) -> pb.WarmupRequest:
    """Requests of ``"_test "`` x truncate until ``max_prefill_tokens`` are covered; all with
    id 0, no blocks/slots, the first one with an image chunk too.

    Without ``max_input_tokens``, a request keeps at most ``max_total_tokens - 1`` prompt tokens,
    so that its ``max_new_tokens = max_total_tokens - truncate`` stays >= 1 (the Rust router
    computes that difference unchecked; with --max-total-tokens below the prefill budget it would
    go negative)."""
    per_request = max_input_tokens
    if per_request is None and max_total_tokens is not None:
        per_request = max_total_tokens - 1
    n_tokens = 0
    requests: list[pb.Request] = []
    image = base64.b64decode(WARMUP_IMAGE_BASE64)
    while n_tokens < max_prefill_tokens:
        truncate = max_prefill_tokens - n_tokens
        if per_request is not None:
            truncate = min(per_request, truncate)
        text = "_test " * truncate
        chunks, inputs = [], text
        if n_tokens == 0:
            chunks.append(pb.InputChunk(image=pb.Image(data=image, mimetype="image/jpeg;base64")))
            inputs += f"![](data:image/jpeg;base64,{WARMUP_IMAGE_BASE64})"
        max_new_tokens = max_total_tokens - truncate if max_total_tokens is not None else 1
        requests.append(
            make_request(
                id=0,
                text=text,
                inputs=inputs,
                extra_chunks=chunks,
                truncate=truncate,
                parameters=chooser_pb(
                    temperature=0.9,
                    top_k=10,
                    top_p=0.9,
                    typical_p=0.9,
                    seed=0,
                    repetition_penalty=1.2,
                    frequency_penalty=0.1,
                    watermark=True,
                ),
                max_new_tokens=max_new_tokens,
                ignore_eos_token=True,
                prefill_logprobs=True,
                top_n_tokens=20,
            )
        )
        n_tokens += truncate
        if max_batch_size is not None and len(requests) == max_batch_size:
            break
    batch = pb.Batch(
        id=0,
        requests=requests,
        size=len(requests),
        max_tokens=max_input_tokens or 0,
        max_blocks=0,
    )
    req = pb.WarmupRequest(batch=batch, max_prefill_tokens=max_prefill_tokens)
    if max_input_tokens is not None:
        req.max_input_tokens = max_input_tokens
    if max_total_tokens is not None:
        req.max_total_tokens = max_total_tokens
    return req


def resolve_limits(
    answer: WarmupAnswer,
    *,
    max_input_tokens: int | None,
    max_total_tokens: int | None,
    max_batch_prefill_tokens: int,
    max_batch_total_tokens: int | None,
    support_chunking: bool,
) -> Limits:
    """Apply ``lib.rs:59-109`` to the warmup answer, then ``main.rs:180-196``'s checks."""
    supported, shard_input, shard_total = answer
    if max_input_tokens is not None and shard_input != max_input_tokens:
        raise LauncherError(
            f"the shards answered Warmup with max_input_tokens={shard_input}, but "
            f"--max-input-tokens={max_input_tokens} was requested (they must echo it)"
        )
    if max_total_tokens is not None and shard_total != max_total_tokens:
        raise LauncherError(
            f"the shards answered Warmup with max_total_tokens={shard_total}, but "
            f"--max-total-tokens={max_total_tokens} was requested (they must echo it)"
        )
    if supported is not None:
        if max_batch_total_tokens is not None:
            # NOTE: TGI ignores it here with a warning; tgi-npu-launcher passed it to the shards as
            # TGI_NPU_KV_CACHE_TOKENS, which sized their KV pool (rounded up to whole blocks).
            log.info(
                f"`--max-batch-total-tokens` {max_batch_total_tokens} sized the KV pool: it holds "
                f"{supported} tokens"
            )
        if shard_total > supported:
            raise LauncherError(
                f"Not enough memory to handle max_total_tokens={shard_total}: the KV cache holds "
                f"{supported} tokens. Lower --max-total-tokens or give the KV cache more memory"
            )
        batch_total = supported
    else:
        batch_total = max_batch_total_tokens or max(16000, shard_total, max_batch_prefill_tokens)
        log.warning("Model does not support automatic max batch total tokens")

    if shard_input >= shard_total:
        raise LauncherError("`max_input_tokens` must be < `max_total_tokens`")
    if not support_chunking and shard_input > max_batch_prefill_tokens:
        raise LauncherError(
            f"`max_batch_prefill_tokens` must be >= `max_input_tokens`. "
            f"Given: {max_batch_prefill_tokens} and {shard_input}"
        )
    if max_batch_prefill_tokens > batch_total:
        raise LauncherError(
            f"`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. "
            f"Given: {max_batch_prefill_tokens} and {batch_total}"
        )
    if shard_total > batch_total:
        raise LauncherError(
            f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {shard_total} and {batch_total}"
        )
    return Limits(shard_input, shard_total, max_batch_prefill_tokens, batch_total)


async def connect_and_warmup(
    client: ShardedClient,
    *,
    max_input_tokens: int | None,
    max_total_tokens: int | None,
    max_batch_prefill_tokens: int,
    max_batch_total_tokens: int | None,
    max_batch_size: int | None,
) -> tuple[pb.InfoResponse, Limits]:
    """ClearCache(all), Info (last shard), Warmup (all, minimum), then the checks."""
    await client.clear_cache(None)
    info = await client.info()
    log.info(
        f"Shard info: device={info.device_type} dtype={info.dtype} block_size={info.block_size} "
        f"requires_padding={info.requires_padding} chunking={info.support_chunking} "
        f"prefix_caching={info.use_prefix_caching} attention={info.attention_impl}"
    )
    log.info("Warming up model")
    request = build_warmup_request(
        max_input_tokens, max_batch_prefill_tokens, max_total_tokens, max_batch_size
    )
    answer = await client.warmup(request)
    limits = resolve_limits(
        answer,
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        max_batch_prefill_tokens=max_batch_prefill_tokens,
        max_batch_total_tokens=max_batch_total_tokens,
        support_chunking=info.support_chunking,
    )
    log.info(f"Setting max batch total tokens to {limits.max_batch_total_tokens}")
    return info, limits
