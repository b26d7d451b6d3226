"""The toy demo model: seeded and reproducible, cached, it learns (its loss falls well below a
random model's), and the command writes it without transformers' deprecation warnings. The
README's run command serving it is tests/launcher/test_readme_demo.py (slow)."""

from __future__ import annotations

import math

import pytest
import torch

from tgi_npu_backend.demo import main, write_checkpoint
from tgi_npu_backend.demo_training import (
    CACHE_ENV,
    Recipe,
    corpus_files,
    read_corpus,
    read_stamp,
    write_trained_checkpoint,
)

TINY = Recipe(steps=6, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, seq_len=32,
              batch_size=4, warmup_steps=2)


@pytest.fixture
def corpus():
    return read_corpus([p for p in corpus_files() if p.name in ("demo.py", "kv_sizing.py")])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_seeded_reproducible_and_cached(tmp_path, corpus, private_cache):
    a, trained = write_trained_checkpoint(tmp_path / "a", TINY, corpus=corpus, progress=False)
    assert trained and read_stamp(a)["recipe"]["steps"] == 6
    assert list(private_cache.iterdir()) and not [p for p in private_cache.iterdir() if p.name.startswith(".")]
    b, trained = write_trained_checkpoint(tmp_path / "b", TINY, corpus=corpus, progress=False)
    assert not trained and _files(a) == _files(b)  # copied from the cache
    assert write_trained_checkpoint(a, TINY, corpus=corpus, progress=False) == (a, False)
    c, trained = write_trained_checkpoint(tmp_path / "c", TINY, corpus=corpus, use_cache=False, progress=False)
    assert trained and _files(c) == _files(a)  # trained again: the same bytes
    d, _ = write_trained_checkpoint(tmp_path / "d", Recipe(**{**TINY.__dict__, "seed": 1}), corpus=corpus,
                                    progress=False)
    assert (d / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    assert "NOT a useful language model" in (a / "README.md").read_text()


def _mean_loss(model_dir, text: str, tokens: int = 64) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:tokens]])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_training_learns_the_corpus(tmp_path, corpus):
    recipe = Recipe(**{**TINY.__dict__, "steps": 60, "hidden_size": 48})
    trained, _ = write_trained_checkpoint(tmp_path / "t", recipe, corpus=corpus, progress=False)
    untrained, _ = write_trained_checkpoint(tmp_path / "u", Recipe(**{**recipe.__dict__, "steps": 1}),
                                            corpus=corpus, progress=False)
    sample = corpus[1][:3000]  # kv_sizing.py: code (demo.py's text samples are many scripts)
    after, before = _mean_loss(trained, sample), _mean_loss(untrained, sample)
    assert before > 0.8 * math.log(recipe.vocab_size)  # about uniform
    assert after < before - 1.0, (before, after)  # 60 steps of a 40k-parameter model


def test_command_writes_a_toy_without_deprecation_warnings(tmp_path, capfd):
    main([str(tmp_path / "toy"), "--steps", "2", "--quiet"])
    out, err = capfd.readouterr()
    assert "wrote a TOY bloom checkpoint" in out
    assert "deprecated" not in out + err and "Token indices" not in out + err, out + err
    main([str(tmp_path / "rnd"), "--random"])
    out, err = capfd.readouterr()
    assert "random-weight" in out and "deprecated" not in out + err
    expected = write_checkpoint(tmp_path / "expected", "bloom", seed=0)
    assert _files(tmp_path / "rnd") == _files(expected)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--steps", "0"])
