"""Fixtures for the data tests."""

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The Llama 3 tokenizer: what `--tokenizer llama3` loads."""
    from llama3.tokenizer import Tokenizer

    return Tokenizer()
