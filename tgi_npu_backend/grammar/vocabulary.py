"""The tokenizer as llguidance sees it: token byte strings and EOS ids."""

from __future__ import annotations

import threading
import weakref

from llguidance import LLTokenizer
from llguidance.hf import from_tokenizer

_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grammar_tokenizer(hf_tokenizer, eos_token_ids) -> LLTokenizer:
    """llguidance's tokenizer for ``hf_tokenizer`` (a transformers fast tokenizer), built once
    per (tokenizer, EOS ids) and reused (a 250k vocabulary takes seconds).

    Its masks cover the tokenizer's ``len()`` ids; a model with more logits than that (BLOOM:
    250,880 logits, 250,680 tokens) never gets the extra ids under a grammar (``mask.py``).
    ``eos_token_ids`` are all the ids that end a request (Gemma: ``<eos>`` and
    ``<end_of_turn>``); a grammar allows them exactly where its text is complete.
    """
    eos = sorted(set(eos_token_ids))
    if not eos:
        raise ValueError("grammar-constrained decoding needs at least one EOS token id")
    key = tuple(eos)
    with _lock:
        per_tokenizer = _cache.setdefault(hf_tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = from_tokenizer(hf_tokenizer, n_vocab=len(hf_tokenizer), eos_token=eos)
        return per_tokenizer[key]
