"""Shared by the data tests: the tokenizer and generated documents.

(A module, not a conftest.py: a second conftest module would shadow the one in tests/ that other test
files import from.)
"""

import numpy as np

from llama3.tokenizer import Tokenizer

TOKENIZER = Tokenizer()  # the Llama 3 tokenizer: what `--tokenizer llama3` loads

SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]


def make_document(seed: int, n_words: int = 80) -> str:
    """Prose-like text of made-up words: passes every default quality filter, and two different
    seeds share (almost) no 5-gram, so documents are neither exact nor near duplicates."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(n_words)]
    sentences, i = [], 0
    while i < n_words:
        n = int(rng.integers(6, 14))
        sentence = " ".join(words[i : i + n])
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        i += n
    return " ".join(sentences)

