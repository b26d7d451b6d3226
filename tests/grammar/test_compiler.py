"""GrammarCompiler: compiled once per (type, value, tokenizer), on a worker thread; refusals
raised at submit, before any batch changes."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from tgi_npu_backend.grammar import GrammarCompiler, GrammarError, GrammarSpec, compiler_for

DIGITS = GrammarSpec("regex", "[0-9]{3}")
OBJ = GrammarSpec("json", '{"type": "object", "properties": {"a": {"type": "integer"}}}')


def test_cached_per_grammar_and_tokenizer(tokenizer):
    compiler = compiler_for(tokenizer, {2})
    assert compiler_for(tokenizer, frozenset([2])) is compiler
    assert compiler_for(tokenizer, {2, 3}) is not compiler  # other EOS ids: other masks
    first = compiler.submit(DIGITS)
    assert isinstance(first, Future)
    assert compiler.submit(GrammarSpec("regex", "[0-9]{3}")) is first
    assert compiler.compile(DIGITS) is first.result()
    assert compiler.submit(OBJ) is not first
    assert GrammarSpec("json", "{}") != GrammarSpec("regex", "{}")  # the type is in the key


def test_builds_off_the_calling_thread(tokenizer, monkeypatch):
    compiler = GrammarCompiler(tokenizer, {2})
    threads = []
    build = GrammarCompiler._build

    def spy(self, spec, grammar):
        threads.append(threading.current_thread().name)
        return build(self, spec, grammar)

    monkeypatch.setattr(GrammarCompiler, "_build", spy)
    compiler.compile(DIGITS)
    assert threads and threads[0].startswith("grammar-compile")
    assert threading.current_thread().name not in threads


def test_evicts_the_least_recently_used(tokenizer):
    compiler = GrammarCompiler(tokenizer, {2}, cache_size=2)
    a = compiler.submit(GrammarSpec("regex", "a+"))
    compiler.submit(GrammarSpec("regex", "b+"))
    assert compiler.submit(GrammarSpec("regex", "a+")) is a  # a is now the most recent
    compiler.submit(GrammarSpec("regex", "c+"))  # evicts b
    assert len(compiler._cache) == 2
    assert compiler.submit(GrammarSpec("regex", "a+")) is a


@pytest.mark.parametrize("spec", [GrammarSpec("regex", "(a"), GrammarSpec("json", '{"type": 1}')])
def test_refusal_at_submit(tokenizer, spec):
    compiler = GrammarCompiler(tokenizer, {2})
    with pytest.raises(GrammarError):
        compiler.submit(spec)
    assert not compiler._cache


def test_masks_cover_the_tokenizer(tokenizer):
    assert compiler_for(tokenizer, {2}).words == (len(tokenizer) + 31) // 32


def test_submit_returns_before_the_build_ends(tokenizer, monkeypatch):
    """Prefill only starts the build; the step that chooses the first token waits for it."""
    compiler = GrammarCompiler(tokenizer, {2})
    release = threading.Event()
    build = GrammarCompiler._build

    def slow(self, spec, grammar):
        assert release.wait(10)
        return build(self, spec, grammar)

    monkeypatch.setattr(GrammarCompiler, "_build", slow)
    future = compiler.submit(DIGITS)
    assert not future.done()
    release.set()
    assert future.result(10) is not None
