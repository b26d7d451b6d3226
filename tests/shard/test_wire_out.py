"""``wire.step_pb`` (filled in place for speed) against the same response built field by field
from the generate.v3 messages' constructors."""

from __future__ import annotations

import pytest

from tgi_npu_backend import wire
from tgi_npu_backend.outputs import CachedBatch, GeneratedText, Generation, StepOutput, Tokens
from tgi_npu_backend.pb import generate_pb2 as pb
from tgi_npu_backend.stopping import FinishReason


def _tokens(t: Tokens) -> pb.Tokens:
    return pb.Tokens(ids=t.ids, logprobs=t.logprobs, texts=t.texts, is_special=t.is_special)


def _expected(step: StepOutput, cls):
    gens = []
    for g in step.generations:
        m = pb.Generation(request_id=g.request_id, tokens=_tokens(g.tokens),
                          top_tokens=[_tokens(t) for t in g.top_tokens])
        if g.prefill_tokens is not None:
            m.prefill_tokens.CopyFrom(_tokens(g.prefill_tokens))
        if g.generated_text is not None:
            text = g.generated_text
            m.generated_text.CopyFrom(pb.GeneratedText(
                text=text.text, generated_tokens=text.generated_tokens,
                finish_reason=int(text.finish_reason), **({} if text.seed is None else {"seed": text.seed})))
        gens.append(m)
    out = cls(generations=gens, forward_ns=step.forward_ns, decode_ns=step.decode_ns, total_ns=step.total_ns)
    if step.batch is not None:
        out.batch.CopyFrom(pb.CachedBatch(id=step.batch.id, request_ids=step.batch.request_ids,
                                          size=step.batch.size, max_tokens=step.batch.max_tokens,
                                          current_tokens=step.batch.current_tokens))
    if step.concat_ns is not None:
        out.concat_ns = step.concat_ns
    return out


@pytest.mark.parametrize("cls", [pb.PrefillResponse, pb.DecodeResponse])
def test_step_pb_carries_every_field(cls):
    gens = [
        Generation(request_id=1, tokens=Tokens([5], [-0.25], [" the"], [False])),
        Generation(request_id=2, tokens=Tokens([2], [-1.5], ["</s>"], [True]),
                   prefill_tokens=Tokens([1, 9, 4], [float("nan"), -2.0, -0.5], ["<s>", "a", "b"],
                                         [True, False, False]),
                   generated_text=GeneratedText("a b", 7, FinishReason.EOS_TOKEN, seed=None),
                   top_tokens=[Tokens([2, 8], [-1.5, -1.75], ["</s>", "c"], [True, False])]),
        Generation(request_id=3, tokens=Tokens([7], [-0.1], ["x"], [False]),
                   generated_text=GeneratedText("xyz", 3, FinishReason.LENGTH, seed=42)),
        Generation(request_id=4, tokens=Tokens([7], [-0.1], ["x"], [False]),
                   generated_text=GeneratedText("", 1, FinishReason.STOP_SEQUENCE, seed=0)),
    ]
    for batch, concat in ((CachedBatch(9, [1, 3], 2, 64, 2), 11), (None, None)):
        step = StepOutput(gens, batch, 100, 200, 300, concat)
        ours, expected = wire.step_pb(step, cls), _expected(step, cls)
        # NaN != NaN: compare the serialized bytes
        assert ours.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
        assert ours.generations[3].generated_text.HasField("seed")  # seed 0 is present
        assert not ours.generations[1].generated_text.HasField("seed")
        assert ours.HasField("batch") == (batch is not None)
        assert ours.HasField("concat_ns") == (concat is not None)
