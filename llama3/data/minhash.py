"""Near-duplicate detection with MinHash signatures and locality-sensitive hashing (LSH).

The Llama 3 paper (section 3.1.1) removes near-duplicate documents with global MinHash (Broder, 1997).
A document becomes the set of its word 5-grams ("shingles"); for each of `num_perm` random hash
functions h, the signature keeps min over shingles of h(shingle). Two signatures agree at a position
with probability equal to the Jaccard similarity of the two shingle sets, so the fraction of agreeing
positions estimates it.

Comparing every pair is quadratic, so LSH cuts the signature into `bands` bands of `rows` values: two
documents become candidates when a whole band matches, which happens with high probability above a
similarity of roughly (1/bands)^(1/rows) and rarely below it. Candidates are then confirmed with the
full-signature estimate against `threshold`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from llama3.data.quality import normalize_text

# The i-th hash function is h_i(x) = mix(x XOR seed_i), with mix the splitmix64 finalizer: a bijection
# of 64-bit integers that scrambles every input bit into every output bit. (The textbook (a*x + b) mod p
# needs 128-bit products to be a good family; with numbers small enough for uint64 it is nearly
# monotone in x and the estimates come out biased.)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1  # uint64 arithmetic wraps around, as intended
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


_CHUNK = 2048  # shingles per step, bounding the (shingles, num_perm) temporary


@dataclass(frozen=True)
class MinHashConfig:
    num_perm: int = 128
    bands: int = 16  # 16 bands of 8 rows: candidates from a similarity of about 0.7
    shingle_words: int = 5
    threshold: float = 0.8  # estimated Jaccard similarity at which a candidate counts as a duplicate
    seed: int = 0

    def __post_init__(self):
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")


class MinHasher:
    def __init__(self, config: MinHashConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.seeds = rng.integers(0, np.iinfo(np.uint64).max, size=config.num_perm, dtype=np.uint64, endpoint=True)

    def shingles(self, text: str) -> set[str]:
        words = normalize_text(text).split()
        n = self.config.shingle_words
        return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 MinHash signature of the text's word shingles."""
        shingles = self.shingles(text)
        # crc32, not hash(): it must agree across processes and runs.
        x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64, count=len(shingles))
        signature = np.full(self.config.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(x), _CHUNK):
            h = _mix64(x[start : start + _CHUNK, None] ^ self.seeds)  # (chunk, num_perm)
            np.minimum(signature, h.min(axis=0), out=signature)
        return (signature & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


class LSHIndex:
    """The signatures of the documents kept so far, bucketed by band, answering "is this a near
    duplicate of something kept?". Documents must be added in a fixed order for reproducible output."""

    def __init__(self, config: MinHashConfig):
        self.config = config
        self.rows = config.num_perm // config.bands
        # One dict per band from the band's bytes to the first kept document with them. Keeping one
        # document per bucket bounds memory; a true near duplicate shares many bands with its original,
        # so it is still found through another band when one bucket belongs to someone else.
        self.buckets: list[dict[bytes, int]] = [{} for _ in range(config.bands)]
        self.signatures: list[np.ndarray] = []

    def _band_keys(self, signature: np.ndarray) -> list[bytes]:
        return [signature[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.config.bands)]

    def is_near_duplicate(self, signature: np.ndarray) -> bool:
        for bucket, key in zip(self.buckets, self._band_keys(signature)):
            other = bucket.get(key)
            if other is not None and estimated_jaccard(signature, self.signatures[other]) >= self.config.threshold:
                return True
        return False

    def add(self, signature: np.ndarray) -> None:
        index = len(self.signatures)
        self.signatures.append(signature)
        for bucket, key in zip(self.buckets, self._band_keys(signature)):
            bucket.setdefault(key, index)
