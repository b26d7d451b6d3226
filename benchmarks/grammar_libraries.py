"""Compare outlines-core, xgrammar and llguidance as the shard's grammar engine (issue 9).

For each library, on one tokenizer: compile time of each grammar, the time to compute one
request's token mask (per decode step, CPU), and correctness: random walks that pick a uniformly
random allowed token at every step (a random-weight model, in effect) must end in text that
validates against the JSON schema (``jsonschema``) or fully matches the regex.

    python benchmarks/grammar_libraries.py --vocab 250880 --walks 5

Needs ``pip install outlines-core xgrammar llguidance jsonschema`` (none of them but llguidance
is a dependency of the shard); a library that is not installed is skipped. The tokenizer is
``bench_grammar.wide_tokenizer`` (a byte-level BPE vocabulary of the requested size built from
the Python standard library's text, as big as BLOOM's 250,880) or, with ``--vocab 512``, the
tests' demo tokenizer. Figures from one run are in docs/grammar.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time

import torch

from bench_grammar import GRAMMARS, wide_tokenizer


def byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level token characters -> bytes."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = ByteLevel.alphabet()
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    assert set(table) == set(chars)
    return table


class Outlines:
    name = "outlines-core"

    def __init__(self, tok, vocab: int):
        from outlines_core import Vocabulary

        decode = byte_decoder()
        mapping: dict[bytes, list[int]] = {}
        for token, i in tok.get_vocab().items():
            if i == tok.eos_token_id or token in tok.all_special_tokens:
                continue
            mapping.setdefault(bytes(decode[c] for c in token), []).append(i)
        self.vocabulary = Vocabulary(tok.eos_token_id, mapping)
        self.vocab = vocab

    def compile(self, kind: str, value: str):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(value) if kind == "json" else value
        return Index(regex, self.vocabulary)

    def matcher(self, compiled):
        from outlines_core import Guide

        return Guide(compiled)

    def fill(self, guide, bitmask: torch.Tensor) -> None:
        guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def advance(self, guide, token: int) -> None:
        if not guide.is_finished():
            guide.advance(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, kind: str, value: str):
        if kind == "json":
            return self.compiler.compile_json_schema(value, any_whitespace=False, separators=(", ", ": "))
        return self.compiler.compile_regex(value)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask.view(1, -1), 0)

    def advance(self, matcher, token: int) -> None:
        matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int):
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)

    def compile(self, kind: str, value: str):
        from tgi_npu_backend.grammar import GrammarSpec

        grammar = GrammarSpec(kind, value).llguidance_grammar()
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def advance(self, matcher, token: int) -> None:
        matcher.consume_token(token)


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # [W, 32]
    return bits.flatten()[:vocab].nonzero().flatten()


def walk(lib, compiled, tok, vocab: int, rng: random.Random, max_steps: int):
    """Uniform random allowed tokens until EOS; (text, finished, per-step mask seconds)."""
    matcher = lib.matcher(compiled)
    bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    tokens, times = [], []
    for _ in range(max_steps):
        start = time.perf_counter()
        lib.fill(matcher, bitmask)
        times.append(time.perf_counter() - start)
        choices = allowed(bitmask, vocab).tolist()
        if not choices:
            return tok.decode(tokens), False, times
        token = rng.choice(choices)
        if token == tok.eos_token_id:
            return tok.decode(tokens), True, times
        tokens.append(token)
        lib.advance(matcher, token)
    return tok.decode(tokens), False, times


def valid(kind: str, value: str, text: str) -> bool:
    if kind == "regex":
        return re.fullmatch(value, text) is not None
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), json.loads(value))
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=250880)
    parser.add_argument("--walks", type=int, default=5, help="random walks per grammar")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--libraries", nargs="+", default=["outlines-core", "xgrammar", "llguidance"])
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    if args.vocab <= 512:
        import tempfile

        from transformers import AutoTokenizer

        from tgi_npu_backend.demo import write_checkpoint

        tok = AutoTokenizer.from_pretrained(write_checkpoint(tempfile.mkdtemp(), "bloom"))
    else:
        tok = wide_tokenizer(args.vocab)
    print(f"tokenizer: {len(tok)} tokens, logits width {args.vocab}")
    for cls in (Outlines, XGrammar, LLGuidance):
        if cls.name not in args.libraries:
            continue
        try:
            start = time.perf_counter()
            lib = cls(tok, args.vocab)
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})")
            continue
        print(f"\n{cls.name}: tokenizer setup {time.perf_counter() - start:.2f} s")
        for name, (kind, value) in GRAMMARS.items():
            start = time.perf_counter()
            try:
                compiled = lib.compile(kind, value)
            except Exception as e:  # noqa: BLE001 - a library's refusal is a result here
                print(f"  {name:10s} compile FAILED: {type(e).__name__}: {str(e)[:120]}")
                continue
            compile_s = time.perf_counter() - start
            rng = random.Random(0)
            results = [walk(lib, compiled, tok, args.vocab, rng, args.max_steps) for _ in range(args.walks)]
            times = [t for _, _, ts in results for t in ts]
            bad = [text for text, finished, _ in results if not (finished and valid(kind, value, text))]
            ok = len(results) - len(bad)
            unfinished = sum(not finished for _, finished, _ in results)
            print(
                f"  {name:10s} compile {compile_s * 1e3:8.1f} ms   mask p50 "
                f"{statistics.median(times) * 1e6:7.0f} us  max {max(times) * 1e3:7.2f} ms   "
                f"valid {ok}/{len(results)} (unfinished {unfinished})   "
                + (f"first invalid: {bad[0][:70]!r}" if bad else f"e.g. {results[0][0][:60]!r}")
            )


if __name__ == "__main__":
    main()
