"""`llama3 data prepare`: raw text in, deduplicated, filtered, tokenized shards out.

The pipeline, per document, in input order:
  read (parent)  ->  parse, quality filters, hash, MinHash, tokenize (worker pool)
                 ->  exact dedup, near dedup, append to shard (parent)
Workers do everything that depends on one document only; the parent keeps the global state (the hashes
and signatures of kept documents) and so decides deduplication in a fixed order: the output does not
depend on the number of workers.

Resuming: after each completed shard, progress.json records the shards done, the position of the next
unread document and the stats so far. A restarted run deletes whatever shard files progress.json does
not list, rebuilds the dedup state from the saved per-shard keys, and continues from that position, so
an interrupted run ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from llama3.data.minhash import LSHIndex, MinHashConfig, MinHasher
from llama3.data.quality import FILTER_NAMES, QualityConfig, document_hash, normalize_text, quality_issue
from llama3.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    STATS_FILE,
    TOKEN_DTYPE,
    ShardWriter,
    load_shard_state,
    read_index,
    remove_shards_from,
    write_json_atomic,
)
from llama3.data.sources import DataError, InputOptions, Record, document_text, expand_inputs, read_records

PROGRESS_FILE = "progress.json"
STATE_DIR = "state"
DROP_REASONS = ("empty", *FILTER_NAMES, "exact_duplicate", "near_duplicate")


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that decides the output (the number of workers does not)."""

    inputs: InputOptions = InputOptions()
    quality: QualityConfig = QualityConfig()  # QualityConfig.off() keeps every non-empty document
    exact_dedup: bool = True
    near_dedup: MinHashConfig | None = None  # None: no near-duplicate removal
    shard_tokens: int = 100_000_000  # a shard closes before a document would take it past this


@dataclass
class PrepareStats:
    files: int = 0
    documents_read: int = 0
    documents_kept: int = 0
    characters_kept: int = 0
    tokens: int = 0
    shards: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def report(self) -> str:
        kept_pct = 100 * self.documents_kept / max(self.documents_read, 1)
        lines = [
            f"files           {self.files:>14,}",
            f"documents read  {self.documents_read:>14,}",
            f"documents kept  {self.documents_kept:>14,}  ({kept_pct:.1f}%)",
            f"tokens          {self.tokens:>14,}  in {self.shards} shard(s)"
            + (f", {self.characters_kept / self.tokens:.2f} chars/token" if self.tokens else ""),
            "dropped:",
        ]
        lines += [f"  {reason:<22}{count:>12,}" for reason, count in self.dropped.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Per-document work (runs in the workers)


@dataclass
class ProcessedDocument:
    reason: str | None  # why it is dropped, or None when it passed the per-document checks
    characters: int
    hash: int = 0
    tokens: np.ndarray | None = None
    signature: np.ndarray | None = None


class DocumentProcessor:
    """Everything that needs one document only: parse, filter, hash, sign, tokenize."""

    def __init__(self, tokenizer, config: PrepareConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.minhasher = MinHasher(config.near_dedup) if config.near_dedup else None

    def __call__(self, record: Record) -> ProcessedDocument:
        text = document_text(record, self.config.inputs.jsonl_field)
        if not text.strip():
            return ProcessedDocument("empty", len(text))
        reason = quality_issue(text, self.config.quality)
        if reason is not None:
            return ProcessedDocument(reason, len(text))
        return ProcessedDocument(
            reason=None,
            characters=len(text),
            hash=document_hash(normalize_text(text)),
            tokens=np.asarray(self.tokenizer.encode(text, bos=True, eos=True), dtype=TOKEN_DTYPE),
            signature=self.minhasher.signature(text) if self.minhasher else None,
        )


_worker_processor: DocumentProcessor | None = None


def _init_worker(tokenizer, config: PrepareConfig) -> None:
    global _worker_processor
    _worker_processor = DocumentProcessor(tokenizer, config)


def _process_chunk(records: list[Record]) -> list[ProcessedDocument]:
    return [_worker_processor(record) for record in records]


def _chunks(items: Iterator[tuple], max_docs: int = 256, max_chars: int = 1 << 18) -> Iterator[list[tuple]]:
    """Group (position, record) pairs into tasks: big enough that the pool's cost per task (pipes,
    pickling, thread hand-offs in the parent) stays a few percent, small enough to balance the workers."""
    chunk, chars = [], 0
    for item in items:
        chunk.append(item)
        chars += len(item[1].payload)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def process_documents(
    records: Iterator[tuple], tokenizer, config: PrepareConfig, workers: int
) -> Iterator[tuple[tuple[int, int], ProcessedDocument]]:
    """(position, processed document) for each (position, record), in input order.

    With several workers, at most 4 tasks per worker are in flight: enough to keep them all busy while
    one slow task holds up the in-order output, and few enough that memory stays bounded however large
    the input is (Pool.imap would read all of it ahead)."""
    if workers <= 1:
        processor = DocumentProcessor(tokenizer, config)
        for position, record in records:
            yield position, processor(record)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer, config)) as pool:
        pending: deque = deque()
        for chunk in _chunks(records):
            positions = [position for position, _ in chunk]
            pending.append((positions, pool.apply_async(_process_chunk, ([record for _, record in chunk],))))
            while len(pending) > 4 * workers:
                positions, result = pending.popleft()
                yield from zip(positions, result.get())
        while pending:
            positions, result = pending.popleft()
            yield from zip(positions, result.get())


# ---------------------------------------------------------------------------------------------------
# The run (parent process)


def load_tokenizer(spec):
    """"llama3" (the Llama 3 tokenizer), a tokenizer.model path, or a tokenizer object (returned as is).
    An object needs `encode(text, bos=, eos=)`, `bos_id` and `eos_id`."""
    if not isinstance(spec, (str, Path)):
        return spec
    from llama3.tokenizer import Tokenizer

    if str(spec) == "llama3":
        return Tokenizer()
    if not Path(spec).is_file():
        raise DataError(f"tokenizer {str(spec)!r}: neither 'llama3' nor an existing tokenizer.model file")
    return Tokenizer(str(spec))


def _tokenizer_name(spec) -> str:
    if isinstance(spec, (str, Path)):
        return "llama3" if str(spec) == "llama3" else str(Path(spec).resolve())
    return getattr(spec, "name", None) or f"{type(spec).__module__}.{type(spec).__qualname__}"


def _fingerprint(files: list[Path], config: PrepareConfig, tokenizer) -> dict:
    """What the output depends on; a resumed run must match it exactly."""
    fingerprint = {
        "inputs": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "config": dataclasses.asdict(config),
        "tokenizer": _tokenizer_name(tokenizer),
    }
    return json.loads(json.dumps(fingerprint))  # tuples become lists, as after a round trip through JSON


def _positioned_records(files: list[Path], options: InputOptions, start: tuple[int, int]) -> Iterator[tuple]:
    """((input number, record number), record) from position `start` on."""
    first_input, first_record = start
    for i in range(first_input, len(files)):
        skip = first_record if i == first_input else 0
        for j, record in enumerate(read_records(files[i], options, skip=skip), start=skip):
            yield (i, j), record


def _clear_outputs(out: Path) -> None:
    """Forget a previous preparation in `out`; its shard files go with the cleanup every run starts with."""
    for name in (INDEX_FILE, STATS_FILE, PROGRESS_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _load_progress(path: Path, fingerprint: dict, n_files: int) -> tuple[list[dict], tuple[int, int], PrepareStats]:
    """(completed shard entries, position of the next document, stats so far) of an unfinished run,
    or a fresh start."""
    if not path.exists():
        return [], (0, 0), PrepareStats(files=n_files)
    saved = json.loads(path.read_text())
    if saved["fingerprint"] != fingerprint:
        raise DataError(f"{path.parent}: holds an unfinished preparation of other inputs or settings; choose another --out or pass --overwrite")
    return saved["shards"], tuple(saved["next"]), PrepareStats(**saved["stats"])


def _restore_dedup_state(state_dir: Path, n_shards: int, config: PrepareConfig) -> tuple[set[int], LSHIndex | None]:
    """The exact-dedup hashes and the LSH index of the documents in the first `n_shards` shards,
    added in their original order so that the index is the one the interrupted run had."""
    seen_hashes: set[int] = set()
    lsh = LSHIndex(config.near_dedup) if config.near_dedup else None
    for number in range(n_shards):
        hashes, signatures = load_shard_state(state_dir, number)
        seen_hashes.update(hashes.tolist())
        for signature in signatures if lsh else ():
            lsh.add(signature)
    return seen_hashes, lsh


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    tokenizer="llama3",
    config: PrepareConfig = PrepareConfig(),
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareStats:
    """Prepare `inputs` (files or directories) into token shards in `out_dir`; returns the stats.

    Running it again on a finished directory with the same inputs and config does nothing; on an
    interrupted one it resumes."""
    files = expand_inputs(list(inputs))
    out = Path(out_dir)
    state_dir = out / STATE_DIR
    workers = workers or default_workers()
    fingerprint = _fingerprint(files, config, tokenizer)

    if overwrite and out.is_dir():
        _clear_outputs(out)
    if (out / INDEX_FILE).exists():
        if read_index(out).get("fingerprint") != fingerprint:
            raise DataError(f"{out}: holds data prepared from other inputs or settings; choose another --out or pass --overwrite")
        return PrepareStats(**json.loads((out / STATS_FILE).read_text()))

    out.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(exist_ok=True)
    progress_path = out / PROGRESS_FILE
    shards, cursor, stats = _load_progress(progress_path, fingerprint, len(files))
    # Forget shards that were being written when the last run stopped, and rebuild the dedup state
    # from the ones that are done.
    remove_shards_from(out, len(shards))
    remove_shards_from(state_dir, len(shards))
    seen_hashes, lsh = _restore_dedup_state(state_dir, len(shards), config)

    tok = load_tokenizer(tokenizer)
    writer = ShardWriter(out, state_dir, number=len(shards))

    def commit(next_position: tuple[int, int]) -> None:
        shards.append(writer.close())
        stats.shards = len(shards)
        record = {"fingerprint": fingerprint, "shards": shards, "next": list(next_position), "stats": dataclasses.asdict(stats)}
        write_json_atomic(progress_path, record)  # the commit point: this shard now counts as done

    bar = tqdm(desc="prepare", unit="doc", initial=stats.documents_read, disable=not progress, dynamic_ncols=True)
    records = _positioned_records(files, config.inputs, start=cursor)
    try:
        for position, doc in process_documents(records, tok, config, workers):
            reason = doc.reason
            if reason is None and config.exact_dedup and doc.hash in seen_hashes:
                reason = "exact_duplicate"
            if reason is None and lsh is not None and lsh.is_near_duplicate(doc.signature):
                reason = "near_duplicate"
            # Close the shard before this document touches any state, so the saved progress
            # describes exactly the documents before `position`.
            if reason is None and writer.documents and writer.tokens + len(doc.tokens) > config.shard_tokens:
                commit(position)
            stats.documents_read += 1
            if reason is not None:
                stats.dropped[reason] += 1
            else:
                stats.documents_kept += 1
                stats.characters_kept += doc.characters
                stats.tokens += len(doc.tokens)
                seen_hashes.add(doc.hash)
                if lsh is not None:
                    lsh.add(doc.signature)
                writer.add(doc.tokens, doc.hash, doc.signature)
            bar.update(1)
            bar.set_postfix(tokens=f"{stats.tokens:,}", refresh=False)
        if writer.documents:
            commit((len(files), 0))
    finally:
        writer.abandon()
        bar.close()

    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": "uint32",
        "tokenizer": {
            "name": _tokenizer_name(tokenizer),
            "vocab_size": getattr(tok, "vocab_size", None),
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
        },
        "total_tokens": stats.tokens,
        "total_documents": stats.documents_kept,
        "shards": shards,
        "fingerprint": fingerprint,
    }
    write_json_atomic(out / STATS_FILE, dataclasses.asdict(stats))
    write_json_atomic(out / INDEX_FILE, index)
    progress_path.unlink(missing_ok=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return stats
