"""A stateful, resumable loader of (inputs, targets) batches from prepared token shards.

The documents of a split, in order, form one token stream (documents stay whole: each starts with
<|begin_of_text|> and ends with <|end_of_text|>). The stream is cut into windows of seq_len + 1 tokens
that overlap by one token, so inputs = window[:-1] and targets = window[1:]. Each epoch visits the
windows in a fresh order drawn from (seed, epoch); global batch k is windows
order[k*B*W : (k+1)*B*W], of which data-parallel rank r takes the r-th block of B. So ranks see
disjoint windows, together they see every window once per epoch (but for fewer than B*W left over),
and the whole position is two integers (epoch, step): `state_dict()` is tiny and resuming continues
with exactly the batches an uninterrupted run would have seen.

The validation split holds out whole documents (a fixed fraction, chosen by a fixed seed that does
not depend on the loader's seed), so train and validation never share text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llama3.data.shards import TokenShards
from llama3.data.sources import DataError

VAL_SPLIT_SEED = 0x11A3A3  # fixes which documents are held out, whatever the training seed


def validation_documents(num_documents: int, val_fraction: float) -> np.ndarray:
    """Sorted numbers of the held-out documents: round(fraction * n), and at least one when the
    fraction is positive and there are two documents or more."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = round(val_fraction * num_documents)
    if val_fraction > 0 and num_documents >= 2:
        count = max(count, 1)
    chosen = np.random.default_rng(VAL_SPLIT_SEED).permutation(num_documents)[:count]
    return np.sort(chosen)


class TokenLoader:
    """Infinite iterator of `(inputs, targets)` LongTensors of shape [batch_size, seq_len], or of
    `(inputs, targets, positions)` with `return_positions=True`, where positions count from 0 at each
    document start: what attention needs to keep documents apart (document masking) and what RoPE
    needs to start every document at position 0."""

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        split: str = "train",
        val_fraction: float = 0.01,
        shuffle: bool = True,
        return_positions: bool = False,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shards = TokenShards(data_dir)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.split, self.shuffle, self.return_positions = split, shuffle, return_positions

        held_out = validation_documents(self.shards.num_documents, val_fraction)
        in_split = np.zeros(self.shards.num_documents, dtype=bool)
        in_split[held_out] = True
        if split == "train":
            in_split = ~in_split
        self._build_stream(np.flatnonzero(in_split))

        self.num_windows = max(self.stream_tokens - 1, 0) // seq_len
        self.steps_per_epoch = self.num_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{data_dir}: the {split} split has {self.stream_tokens:,} tokens, fewer than one batch needs "
                f"({batch_size * world_size} ranks x rows of {seq_len + 1} tokens); use more data or a smaller batch"
            )
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = None, None

    def _build_stream(self, docs: np.ndarray) -> None:
        """Lay the split's documents end to end. Documents adjacent in the same shard merge into one
        run, so reading a window touches few slices; `doc_offsets` are the document starts in stream
        coordinates, for positions."""
        s = self.shards
        shard, start, end = s.doc_shard[docs], s.doc_start[docs], s.doc_end[docs]
        lengths = end - start
        self.doc_offsets = (np.cumsum(lengths) - lengths).astype(np.int64)
        self.stream_tokens = int(lengths.sum())
        # A new run begins where the shard changes or the previous document does not end right here.
        new_run = np.ones(len(docs), dtype=bool)
        new_run[1:] = (shard[1:] != shard[:-1]) | (start[1:] != end[:-1])
        first = np.flatnonzero(new_run)
        self.run_shard = shard[first]
        self.run_start = start[first]
        self.run_offset = self.doc_offsets[first]  # where each run begins in the stream
        self.run_length = np.diff(np.append(self.run_offset, self.stream_tokens))

    def _read(self, offset: int, length: int) -> np.ndarray:
        """Stream tokens [offset, offset + length) as int64."""
        out = np.empty(length, dtype=np.int64)
        run = int(np.searchsorted(self.run_offset, offset, side="right")) - 1
        done = 0
        while done < length:
            inside = offset + done - self.run_offset[run]
            take = min(length - done, int(self.run_length[run] - inside))
            begin = int(self.run_start[run] + inside)
            out[done : done + take] = self.shards.tokens[self.run_shard[run]][begin : begin + take]
            done += take
            run += 1
        return out

    def _window_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def batch_windows(self, epoch: int, step: int) -> np.ndarray:
        """The window numbers of this rank's batch at (epoch, step)."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return self._window_order(epoch)[first : first + self.batch_size]

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        windows = self.batch_windows(self.epoch, self.step)
        self.step += 1
        T = self.seq_len
        rows = np.stack([self._read(int(w) * T, T + 1) for w in windows])  # (B, T+1)
        batch = torch.from_numpy(rows)
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if not self.return_positions:
            return inputs, targets
        stream_pos = windows[:, None].astype(np.int64) * T + np.arange(T)  # (B, T) stream offsets of inputs
        doc = np.searchsorted(self.doc_offsets, stream_pos, side="right") - 1
        positions = torch.from_numpy(stream_pos - self.doc_offsets[doc])
        return inputs, targets, positions

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "split": self.split,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. The data, split, batch shape, world size and seed must be the ones it
        was saved with, or the same (epoch, step) would name different batches."""
        for key in ("seed", "batch_size", "seq_len", "world_size", "split", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]!r}, this loader has {getattr(self, key)!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
