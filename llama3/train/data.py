"""What the trainer needs from data: iterators of (inputs, targets, positions) batches that can save and restore
their position. Real corpora come from `llama3.data`; `SyntheticTokens` is a learnable random stream for tests and
benchmarks.

Both follow one rule so that the parallel layout does not change the data: global batch k is the rows
[k * B * W, (k + 1) * B * W) of the stream, and data-parallel rank r takes the r-th block of B rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError

IGNORE = -100  # the target of a token that is not learned (cross_entropy's ignore_index): prompts, padding


class SyntheticTokens:
    """Random documents a model can learn: each token is one of 4 successors of the previous one.

    The vocabulary is put on one random cycle and every next token is 1-4 places further along it, so the best
    possible loss is ln 4 ~ 1.39 while a fresh model starts near ln(vocab_size). Documents end at random (mean
    length `mean_doc_len`); positions restart at 0 at each document. Row n of split s is a pure function of
    (seed, s, n), so any batch can be rebuilt from the step number alone.
    """

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, *, split: str = "train", mean_doc_len: int = 64):
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.rank, self.world_size, self.seed, self.split = rank, world_size, seed, split
        self.mean_doc_len = mean_doc_len
        self.cycle = np.random.default_rng(seed).permutation(vocab_size)
        self.step = 0

    def row(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Row n of the stream: seq_len + 1 tokens and the position of each within its document."""
        rng = np.random.default_rng([self.seed, ("train", "val").index(self.split), n])
        T, V = self.seq_len + 1, self.vocab_size
        hops = rng.integers(1, 5, T)
        hops[0] = 0
        tokens = self.cycle[(rng.integers(V) + np.cumsum(hops)) % V]
        new_doc = rng.random(T) < 1 / self.mean_doc_len
        new_doc[0] = True
        tokens = np.where(new_doc, self.cycle[rng.integers(V, size=T)], tokens)  # each document starts anywhere
        index = np.arange(T)
        doc_start = np.maximum.accumulate(np.where(new_doc, index, 0))
        return tokens, index - doc_start

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        first = (self.step * self.world_size + self.rank) * self.batch_size
        rows = [self.row(n) for n in range(first, first + self.batch_size)]
        self.step += 1
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))  # (B, T + 1)
        positions = torch.from_numpy(np.stack([r[1] for r in rows]))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), positions[:, :-1].contiguous()

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved stream stopped. Another split of the same rows (more or fewer data-parallel
        ranks, as when a host drops out of an elastic job and comes back) continues on the same rows, as long as
        the rows consumed make whole batches of the new split."""
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed={state['seed']!r}, this run has {self.seed!r}")
        rows = int(state["step"]) * state["batch_size"] * state["world_size"]
        per_batch = self.batch_size * self.world_size
        if rows % per_batch:
            raise ValueError(f"data state was saved after {rows} rows, not a whole number of batches of "
                             f"batch_size={self.batch_size} x world_size={self.world_size}")
        self.step = rows // per_batch


def dataset_dir(dataset: str) -> Path | None:
    """The prepared token directory a `data.dataset` setting names (None for synthetic data). The built-in corpus
    is built on first use."""
    if dataset == "synthetic":
        return None
    from ..data import prepare_default_corpus
    return prepare_default_corpus() if dataset == "default" else Path(dataset)


def data_tokenizer(data_dir: Path | None, vocab_size: int):
    """The tokenizer the data was prepared with (to ship next to the trained weights), checked against the model's
    vocabulary; None for synthetic data."""
    if data_dir is None:
        return None
    from ..data.prepare import load_tokenizer
    from ..data.shards import read_index
    info = read_index(data_dir)["tokenizer"]
    if (info.get("vocab_size") or 0) > vocab_size:
        raise ConfigError(f"data.dataset {data_dir}: its tokenizer has {info['vocab_size']} tokens, more than "
                          f"the model's vocab_size {vocab_size}")
    return load_tokenizer(info["name"])


def build_loader(data_dir: Path | None, *, vocab_size: int, batch_size: int, seq_len: int, rank: int,
                 world_size: int, seed: int, split: str, val_fraction: float):
    """The batches of one split for one data-parallel rank, each (inputs, targets, positions)."""
    if data_dir is None:
        return SyntheticTokens(vocab_size, batch_size, seq_len, rank, world_size, seed, split=split)
    from ..data import TokenLoader
    return TokenLoader(data_dir, batch_size, seq_len, rank, world_size, seed, split=split, val_fraction=val_fraction,
                       shuffle=split == "train", return_positions=True)


def document_mask(positions: Tensor) -> Tensor:
    """(B, T) positions restarting at 0 at each document -> (B, 1, T, T) boolean mask: causal and same document.

    A document starts wherever the position is 0; tokens before the row's first start belong to the document the
    row began inside of."""
    doc = (positions == 0).cumsum(dim=1)  # (B, T) document number within the row
    same_doc = doc[:, :, None] == doc[:, None, :]
    T = positions.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return (same_doc & causal)[:, None]
