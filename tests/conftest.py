"""Session-wide fixtures: one small jsonl corpus and one tokenizer trained on it (training a tokenizer is
most of a tiny run's start-up, so tests that only need *a* tokenizer share this one)."""

import pytest

from maxlm import tokenizer
from tests.test_train import _corpus, small_config


@pytest.fixture(scope="session")
def shared_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared_data") / "corpus.jsonl"
    _corpus(path)
    return path


@pytest.fixture(scope="session")
def shared_tok_path(shared_corpus, tmp_path_factory):
    """A 320-piece BPE model with the ChatML markers as user-defined symbols (`small_config`'s choices)."""
    folder = tmp_path_factory.mktemp("shared_tok")
    tokenizer.load_or_train(small_config(shared_corpus), str(folder))
    return str(folder / "tokenizer.model")
