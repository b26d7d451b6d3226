from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer(bloom_dir):
    """The tiny BLOOM checkpoint's byte-level BPE tokenizer (512 tokens, EOS ``</s>`` = 2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bloom_dir)
