"""Fixtures for the launcher tests: the tiny BLOOM checkpoint's tokenizer (from tests/conftest.py)
and a router wired to in-process fake shards (``harness.fake_router``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf_tokenizer(bloom_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bloom_dir)
