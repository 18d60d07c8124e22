"""Document quality heuristics and the text normalization used for deduplication.

The Llama 3 paper (section 3.1.1) filters web text with heuristics that remove "additional low-quality
documents, outliers, and documents with excessive repetitions", naming the duplicated n-gram coverage
ratio of Rae et al. (2021, "Gopher"). The filters below follow Gopher's quality rules; the default
thresholds are Gopher's. Every filter has a name, which is what the stats report counts.

A threshold set to None switches its filter off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

BULLETS = ("-", "*", "•", "‣", "◦", "⁃", "●", "▪")
ELLIPSES = ("...", "…")
# A whitespace-delimited word made only of digits, underscores and non-word characters: no letter.
# (One regex pass instead of a Python loop over characters; it differs from str.isalpha only on
# non-decimal numerals such as "½", which it counts as letters.)
_WORD_WITHOUT_LETTER = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")


@dataclass(frozen=True)
class QualityConfig:
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    # ('#' + ellipses) per word: a high ratio means lists of hashtags or truncated teasers.
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_line_fraction: float | None = 0.9
    max_ellipsis_line_fraction: float | None = 0.3
    # Fraction of words with at least one letter; a low one means tables of numbers or markup.
    min_alpha_word_fraction: float | None = 0.8
    # Non-empty lines that repeat an earlier line, by count and by characters (boilerplate, logs).
    max_duplicate_line_fraction: float | None = 0.3
    max_duplicate_line_char_fraction: float | None = 0.2
    # Characters taken by the single most frequent word n-gram, for small n.
    max_top_ngram_char_fraction: tuple[tuple[int, float], ...] | None = ((2, 0.20), (3, 0.18), (4, 0.16))
    # Characters inside repeated occurrences of word n-grams (the "duplicated n-gram coverage ratio").
    max_duplicate_ngram_char_fraction: tuple[tuple[int, float], ...] | None = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10),
    )

    @classmethod
    def off(cls) -> "QualityConfig":
        """No heuristic filter at all (only empty documents and duplicates are dropped)."""
        return cls(**{f.name: None for f in dataclasses.fields(cls)})

    def with_overrides(self, overrides: list[str]) -> "QualityConfig":
        """A copy with `name=value` overrides from the command line; "none" switches a filter off and
        n-gram thresholds are written `n:fraction,n:fraction`."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for item in overrides:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in fields:
                raise ValueError(f"--quality {item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
            try:
                changes[name] = _parse_threshold(text.strip(), getattr(QualityConfig, name))
            except ValueError:
                raise ValueError(f"--quality {item!r}: cannot read {text!r} as a value for {name}") from None
        return dataclasses.replace(self, **changes)


def _parse_threshold(text: str, default: object) -> object:
    if text.lower() in ("none", "off"):
        return None
    if isinstance(default, tuple):
        pairs = [pair.split(":") for pair in text.split(",")]
        return tuple((int(n), float(frac)) for n, frac in pairs)
    return type(default)(text)


FILTER_NAMES = (
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "symbol_word_ratio",
    "bullet_lines",
    "ellipsis_lines",
    "alpha_words",
    "duplicate_lines",
    "duplicate_line_chars",
    "top_ngram",
    "duplicate_ngram",
)


def quality_issue(text: str, config: QualityConfig) -> str | None:
    """The name of the first filter `text` fails, or None when it passes them all.
    Cheap checks come first so that most rejected documents never reach the n-gram loops."""
    c = config
    words = text.split()
    n_words = len(words)
    if c.min_words is not None and n_words < c.min_words:
        return "too_few_words"
    if c.max_words is not None and n_words > c.max_words:
        return "too_many_words"
    if n_words == 0:
        return None  # nothing below is defined; only a min_words filter could reject this
    mean_length = sum(map(len, words)) / n_words
    if (c.min_mean_word_length is not None and mean_length < c.min_mean_word_length) or (
        c.max_mean_word_length is not None and mean_length > c.max_mean_word_length
    ):
        return "mean_word_length"
    if c.max_symbol_word_ratio is not None:
        symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
        if symbols / n_words > c.max_symbol_word_ratio:
            return "symbol_word_ratio"
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if c.max_bullet_line_fraction is not None:
        if sum(line.startswith(BULLETS) for line in lines) / len(lines) > c.max_bullet_line_fraction:
            return "bullet_lines"
    if c.max_ellipsis_line_fraction is not None:
        if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > c.max_ellipsis_line_fraction:
            return "ellipsis_lines"
    if c.min_alpha_word_fraction is not None:
        if 1 - len(_WORD_WITHOUT_LETTER.findall(text)) / n_words < c.min_alpha_word_fraction:
            return "alpha_words"
    if c.max_duplicate_line_fraction is not None or c.max_duplicate_line_char_fraction is not None:
        repeated, repeated_chars = _repeats(lines)
        if c.max_duplicate_line_fraction is not None and repeated / len(lines) > c.max_duplicate_line_fraction:
            return "duplicate_lines"
        total_chars = sum(map(len, lines))
        if c.max_duplicate_line_char_fraction is not None and repeated_chars / total_chars > c.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"
    if c.max_top_ngram_char_fraction or c.max_duplicate_ngram_char_fraction:
        ngrams = WordNGrams(words)
        for n, limit in c.max_top_ngram_char_fraction or ():
            if ngrams.top_char_fraction(n) > limit:
                return "top_ngram"
        for n, limit in c.max_duplicate_ngram_char_fraction or ():
            if ngrams.duplicate_char_fraction(n) > limit:
                return "duplicate_ngram"
    return None


def _repeats(items: list[str]) -> tuple[int, int]:
    """How many items repeat an earlier one, and their total length."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


# Odd multiplier of the polynomial n-gram hash; n-grams are hashed, not compared word by word, so that
# the counting runs in numpy (these two checks were most of the filtering time as Python loops).
_NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)


class WordNGrams:
    """The word n-grams of one document, as one 64-bit value per n-gram start: equal n-grams get equal
    values, and distinct ones (but for a 2^-64-rare hash collision) distinct values."""

    def __init__(self, words: list[str]):
        vocab: dict[str, int] = {}
        self.ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words))
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.chars = int(self.lengths.sum())
        self._length_sums = np.concatenate([[0], np.cumsum(self.lengths)])

    def hashes(self, n: int) -> np.ndarray:
        count = len(self.ids) - n + 1
        h = np.zeros(max(count, 0), dtype=np.uint64)
        for k in range(n):
            h = h * _NGRAM_BASE + self.ids[k : k + count]  # uint64 arithmetic wraps around, as intended
        return h

    def window_chars(self, n: int) -> np.ndarray:
        """Characters in the n-gram starting at each word."""
        return self._length_sums[n:] - self._length_sums[:-n]

    def top_char_fraction(self, n: int) -> float:
        """Share of the word characters taken by all occurrences of the most frequent n-gram (of the
        longest, when several are most frequent)."""
        if len(self.ids) < n:
            return 0.0
        _, first, counts = np.unique(self.hashes(n), return_index=True, return_counts=True)
        best = counts.max()
        if best == 1:
            return 0.0
        return float(best * self.window_chars(n)[first[counts == best]].max() / self.chars)

    def duplicate_char_fraction(self, n: int) -> float:
        """Share of the word characters inside an n-gram that already occurred earlier in the document
        (overlapping repeats count each word once), so a text written out twice scores 0.5."""
        if len(self.ids) < n:
            return 0.0
        _, first, inverse = np.unique(self.hashes(n), return_index=True, return_inverse=True)
        repeats = np.flatnonzero(first[inverse] != np.arange(len(inverse)))  # starts of later occurrences
        # Words [i, i + n) of each repeat are covered: +1 at i, -1 at i + n, covered where the running sum > 0.
        size = len(self.ids) + 1
        starts_minus_ends = np.bincount(repeats, minlength=size) - np.bincount(repeats + n, minlength=size)
        covered = np.cumsum(starts_minus_ends[:-1]) > 0
        return float(self.lengths[covered].sum() / self.chars)


def normalize_text(text: str) -> str:
    """The text that deduplication compares: Unicode NFKC, lower case, whitespace runs made one space,
    so copies that differ only in case, spacing or Unicode presentation count as the same document."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def document_hash(normalized: str) -> int:
    """A 64-bit hash of normalized text for exact deduplication (stable across runs and processes,
    unlike Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest(), "little")
