from collections import Counter

import numpy as np
import pytest

from llama3.data.minhash import LSHIndex, MinHashConfig, MinHasher, estimated_jaccard
from llama3.data.quality import FILTER_NAMES, QualityConfig, WordNGrams, document_hash, normalize_text, quality_issue
from data_testkit import make_document


def _words(seed, n):
    return make_document(seed, n).replace(".", "").lower().split()


def _lines(seed, n_lines, words_per_line):
    words = _words(seed, n_lines * words_per_line)
    return [" ".join(words[i * words_per_line : (i + 1) * words_per_line]) for i in range(n_lines)]


def crafted(name: str) -> str:
    """A document that passes every default filter checked before `name` and fails `name`."""
    if name == "too_few_words":
        return "Hello there, world."
    if name == "too_many_words":
        return "lorem " * 100_001
    if name == "mean_word_length":
        return " ".join(["a ox is by me to go up"] * 8)
    if name == "symbol_word_ratio":
        return make_document(2) + " " + " ".join(f"#tag{i}" for i in range(20))
    if name == "bullet_lines":
        return "\n".join("- " + line for line in _lines(3, 20, 5))
    if name == "ellipsis_lines":
        return "\n".join(line + ("..." if i % 2 else ".") for i, line in enumerate(_lines(4, 10, 12)))
    if name == "alpha_words":
        return make_document(5) + " " + " ".join(str(10_000 + i) for i in range(40))
    if name == "duplicate_lines":
        return "\n".join(_lines(6, 10, 6) + ["all right then"] * 10)
    if name == "duplicate_line_chars":
        long_line = " ".join(_words(7, 40))
        return "\n".join(_lines(8, 8, 5) + [long_line] * 3)
    if name == "top_ngram":
        return " ".join(f"{w} new york" for w in _words(9, 60))
    if name == "duplicate_ngram":
        text = make_document(10)
        return text + " " + text
    raise AssertionError(name)


@pytest.mark.parametrize("name", FILTER_NAMES)
def test_each_filter_rejects_its_crafted_document(name):
    assert quality_issue(crafted(name), QualityConfig()) == name
    assert quality_issue(crafted(name), QualityConfig.off()) is None


@pytest.mark.parametrize("seed", range(5))
def test_ordinary_prose_passes_every_filter(seed):
    assert quality_issue(make_document(seed, 300), QualityConfig()) is None


def _reference_top(words, n):
    grams = Counter(zip(*(words[i:] for i in range(n))))
    best = max(grams.values(), default=1)
    if best == 1:
        return 0.0
    return best * max(sum(map(len, g)) for g, c in grams.items() if c == best) / sum(map(len, words))


def _reference_duplicate(words, n):
    seen, covered = set(), [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            covered[i : i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / sum(map(len, words))


@pytest.mark.parametrize("seed", range(20))
def test_ngram_fractions_match_their_definition(seed):
    rng = np.random.default_rng(seed)
    vocab = _words(seed, 12)  # a small vocabulary, so n-grams repeat, overlap and tie
    words = list(rng.choice(vocab, size=int(rng.integers(1, 120))))
    ngrams = WordNGrams(words)
    for n in range(2, 11):
        assert ngrams.top_char_fraction(n) == pytest.approx(_reference_top(words, n))
        assert ngrams.duplicate_char_fraction(n) == pytest.approx(_reference_duplicate(words, n))


def test_alpha_word_fraction_counts_words_with_a_letter():
    words = ["abc123", "123", "__", "---", "é", "(x)", "42%", "ñ_1", "Ω", "v2.0", "3.14", "…"] * 6
    with_letter = sum(any(ch.isalpha() for ch in w) for w in words) / len(words)
    config = QualityConfig.off()
    just_below = config.with_overrides([f"min_alpha_word_fraction={with_letter - 1e-9}"])
    just_above = config.with_overrides([f"min_alpha_word_fraction={with_letter + 1e-9}"])
    assert quality_issue(" ".join(words), just_below) is None
    assert quality_issue(" ".join(words), just_above) == "alpha_words"


def test_thresholds_are_configurable_and_switch_off():
    config = QualityConfig().with_overrides(["min_words=3", "max_duplicate_ngram_char_fraction=none"])
    assert config.min_words == 3 and config.max_duplicate_ngram_char_fraction is None
    assert quality_issue("Hello there, world.", config) is None
    assert quality_issue(crafted("duplicate_ngram"), config) is None
    config = QualityConfig().with_overrides(["max_top_ngram_char_fraction=2:0.9,3:0.9"])
    assert config.max_top_ngram_char_fraction == ((2, 0.9), (3, 0.9))
    with pytest.raises(ValueError, match="no_such_threshold"):
        QualityConfig().with_overrides(["no_such_threshold=1"])
    with pytest.raises(ValueError, match="min_words"):
        QualityConfig().with_overrides(["min_words=many"])


def test_normalized_hash_ignores_case_spacing_and_unicode_form():
    a = "The  Quick\tbrown fox\n"
    b = "the quick BROWN fox"
    c = "ｔｈｅ quick brown fox"  # full-width letters: NFKC folds them
    assert normalize_text(a) == normalize_text(b) == normalize_text(c) == "the quick brown fox"
    assert document_hash(normalize_text(a)) == document_hash(normalize_text(c))
    assert document_hash("the quick brown fox") != document_hash("the quick brown box")


def _jaccard(hasher, a, b):
    sa, sb = hasher.shingles(a), hasher.shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard_and_is_deterministic():
    hasher = MinHasher(MinHashConfig(num_perm=256, bands=32))
    base = _words(20, 400)
    edited = list(base)
    for i in range(0, 400, 40):
        edited[i] = "changed"
    a, b = " ".join(base), " ".join(edited)
    truth = _jaccard(hasher, a, b)
    assert 0.5 < truth < 0.9
    assert abs(estimated_jaccard(hasher.signature(a), hasher.signature(b)) - truth) < 0.1
    assert estimated_jaccard(hasher.signature(a), hasher.signature(" ".join(_words(21, 400)))) < 0.05
    again = MinHasher(MinHashConfig(num_perm=256, bands=32))
    assert np.array_equal(hasher.signature(a), again.signature(a))
    other_seed = MinHasher(MinHashConfig(num_perm=256, bands=32, seed=1))
    assert not np.array_equal(hasher.signature(a), other_seed.signature(a))


def test_lsh_finds_near_duplicates_only():
    config = MinHashConfig()
    hasher, index = MinHasher(config), LSHIndex(config)
    originals = [make_document(seed, 300) for seed in range(20)]
    for text in originals:
        index.add(hasher.signature(text))
    near = originals[3].replace(".", "!", 2)  # punctuation edits leave almost every shingle alone
    assert index.is_near_duplicate(hasher.signature(near))
    assert not any(index.is_near_duplicate(hasher.signature(make_document(seed, 300))) for seed in range(100, 120))
    with pytest.raises(ValueError, match="multiple of bands"):
        MinHashConfig(num_perm=100, bands=16)
