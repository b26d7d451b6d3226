"""Grammars compiled once per (type, value, tokenizer), off the generator thread.

``GrammarCompiler.submit`` is called while a Prefill's batch is built: it checks the grammar
(the same check as ``check_grammar``, so a bad one fails that Prefill before anything changes)
and starts the tokenizer-dependent build on a worker thread, so the build overlaps the prefill's
forward pass; the first mask waits for it. llguidance releases the GIL while it builds.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from llguidance import LLMatcher

from .spec import GrammarError, GrammarSpec
from .vocabulary import grammar_tokenizer


class GrammarCompiler:
    """Compiles grammars for one tokenizer; keeps the last ``cache_size`` compiled.

    A compiled grammar is a pristine ``LLMatcher``; each request gets a ``deep_copy`` of it
    (the compiled grammar is shared, the parse state is the request's own).
    """

    def __init__(self, hf_tokenizer, eos_token_ids, cache_size: int = 64):
        self.tokenizer = grammar_tokenizer(hf_tokenizer, eos_token_ids)
        # int32 words of one request's allowed-token bits
        self.words = (self.tokenizer.vocab_size + 31) // 32
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")

    def submit(self, spec: GrammarSpec) -> Future:
        """A future of the compiled grammar; raises :class:`GrammarError` at once when the
        grammar is refused without a tokenizer (bad JSON, unsupported keyword, bad regex)."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
        grammar = spec.llguidance_grammar()  # raises GrammarError
        with self._lock:
            future = self._cache.get(spec)
            if future is None:
                future = self._pool.submit(self._build, spec, grammar)
                self._cache[spec] = future
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return future

    def compile(self, spec: GrammarSpec) -> LLMatcher:
        """The compiled grammar, waiting for it (raises :class:`GrammarError`)."""
        return self.submit(spec).result()

    def _build(self, spec: GrammarSpec, grammar: str) -> LLMatcher:
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():  # deterministic for this tokenizer: cached like a success
            raise GrammarError(f"the grammar cannot be compiled: {matcher.get_error()}")
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_compilers_lock = threading.Lock()
_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiler_for(hf_tokenizer, eos_token_ids) -> GrammarCompiler:
    """The process's one compiler (and cache) for this tokenizer and EOS ids: grammars are
    cached on (type, value, tokenizer)."""
    key = frozenset(eos_token_ids)
    with _compilers_lock:
        per_tokenizer = _compilers.setdefault(hf_tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = GrammarCompiler(hf_tokenizer, key)
        return per_tokenizer[key]
