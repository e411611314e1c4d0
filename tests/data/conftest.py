"""Fixtures of the data tests."""

import pytest

from elmtune.tokenizer import load_tokenizer
from tests.helpers import shared_path


@pytest.fixture(scope="module")
def llama2():
    """The real Llama-2 tokenizer from ../shared (the tutorial's); skipped, saying so, when absent."""
    return load_tokenizer(str(shared_path("data", "llama2-tokenizer")))
