"""The on-disk format of prepared data: token shards, document boundaries and the index.

A prepared directory holds:
  shard_00000.bin        the tokens of whole documents, back to back, raw little-endian uint32
                         (Llama 3's vocabulary of 128256 does not fit uint16)
  shard_00000.docs.npy   uint64 document boundaries into that shard: document i is tokens[b[i]:b[i+1]]
  index.json             format, dtype, tokenizer, and per shard its files and token/document counts
  stats.json             what preparation read, kept and dropped, and why

Each document is `<|begin_of_text|> text <|end_of_text|>`, so documents can be recovered and attention
can be masked at their boundaries. The boundaries live in .npy files beside the shards, not in the JSON,
so the index stays small and fast to load for corpora of millions of documents.

Files appear only complete: each is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from llama3.data.sources import DataError

TOKEN_DTYPE = np.dtype("<u4")
INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
FORMAT = "llama3-tokens"
FORMAT_VERSION = 1
_SHARD_FILE = re.compile(r"^shard_(\d{5})\.")


def shard_name(number: int) -> str:
    return f"shard_{number:05d}"


def write_atomic(path: Path, write) -> None:
    """Write a file through `write(binary_file)` under a temporary name, flush it to disk, then rename,
    so a crash leaves either the old file, no file, or the complete new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8") + b"\n"))


def remove_shards_from(directory: Path, first: int) -> None:
    """Delete shard files numbered `first` or above, and any temporary file: what a run that stopped
    half way left behind without recording it as done."""
    for path in directory.iterdir():
        match = _SHARD_FILE.match(path.name)
        if (match and int(match.group(1)) >= first) or (path.name.startswith("shard_") and path.name.endswith(".tmp")):
            path.unlink()


class ShardWriter:
    """Appends documents to the current shard, which becomes visible (renamed) when closed.

    Besides tokens, each document brings its dedup keys (exact hash, optional MinHash signature); they
    are saved per shard under `state_dir` so that a resumed run can rebuild the dedup state of exactly
    the documents in completed shards.
    """

    def __init__(self, directory: Path, state_dir: Path, number: int):
        self.directory, self.state_dir, self.number = directory, state_dir, number
        self._file = None
        self._reset()

    def _reset(self) -> None:
        self.tokens = 0
        self.boundaries = [0]
        self.hashes: list[int] = []
        self.signatures: list[np.ndarray] = []

    @property
    def documents(self) -> int:
        return len(self.boundaries) - 1

    def _path(self, suffix: str) -> Path:
        return self.directory / f"{shard_name(self.number)}{suffix}"

    def add(self, tokens: np.ndarray, doc_hash: int, signature: np.ndarray | None) -> None:
        if self._file is None:
            self._file = open(self._path(".bin.tmp"), "wb")
        self._file.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        self.tokens += len(tokens)
        self.boundaries.append(self.tokens)
        self.hashes.append(doc_hash)
        if signature is not None:
            self.signatures.append(signature)

    def close(self) -> dict:
        """Finish the current shard; returns its index entry. The next add starts a new shard."""
        assert self._file is not None, "closing an empty shard"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        boundaries = np.asarray(self.boundaries, dtype=np.uint64)
        write_atomic(self._path(".docs.npy"), lambda f: np.save(f, boundaries))
        state = {"hashes": np.asarray(self.hashes, dtype=np.uint64)}
        if self.signatures:
            state["signatures"] = np.stack(self.signatures)
        write_atomic(self.state_dir / f"{shard_name(self.number)}.npz", lambda f: np.savez(f, **state))
        os.replace(self._path(".bin.tmp"), self._path(".bin"))
        entry = {
            "tokens": self.tokens,
            "documents": self.documents,
            "file": self._path(".bin").name,
            "doc_boundaries": self._path(".docs.npy").name,
        }
        self.number += 1
        self._reset()
        return entry

    def abandon(self) -> None:
        """Close the temporary file of an unfinished shard (after an error); resuming deletes it."""
        if self._file is not None:
            self._file.close()
            self._file = None


def load_shard_state(state_dir: Path, number: int) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(state_dir / f"{shard_name(number)}.npz") as state:
        return state["hashes"], (state["signatures"] if "signatures" in state else None)


def read_index(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        hint = " (preparation has not finished: run it again to resume)" if (directory / "progress.json").exists() else ""
        raise DataError(f"{directory}: not a prepared data directory, no {INDEX_FILE}{hint}; make one with `llama3 data prepare`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} index")
    return index


class TokenShards:
    """Read access to a prepared directory: every shard memory-mapped, documents by global number."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        self.tokens: list[np.ndarray] = []
        shard_of, starts, ends = [], [], []
        for number, entry in enumerate(self.index["shards"]):
            path = self.directory / entry["file"]
            expected = entry["tokens"] * TOKEN_DTYPE.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{path}: missing or not {expected} bytes as {INDEX_FILE} says")
            self.tokens.append(np.memmap(path, dtype=TOKEN_DTYPE, mode="r"))
            boundaries = np.load(self.directory / entry["doc_boundaries"]).astype(np.int64)
            shard_of.append(np.full(len(boundaries) - 1, number, dtype=np.int64))
            starts.append(boundaries[:-1])
            ends.append(boundaries[1:])
        # Per document: the shard it lives in and its [start, end) token range there.
        self.doc_shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int64)
        self.doc_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.doc_end = np.concatenate(ends) if ends else np.zeros(0, np.int64)

    @property
    def num_documents(self) -> int:
        return len(self.doc_shard)

    @property
    def num_tokens(self) -> int:
        return int(self.index["total_tokens"])

    def document(self, i: int) -> np.ndarray:
        """The tokens of document i, <|begin_of_text|> and <|end_of_text|> included."""
        return self.tokens[self.doc_shard[i]][self.doc_start[i] : self.doc_end[i]]
