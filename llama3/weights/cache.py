"""A cache of converted checkpoints, so that the second load of a file is a memory map instead of a conversion.

Converting a GGUF file costs far more than reading it: dequantizing or repacking its blocks, re-quantizing to
int8, packing int4 for the CPU kernel, parsing a 128k-token vocabulary and building its BPE tables (tens of
seconds for a 1B model). An entry keeps the result: the model's tensors as built and the tokenizer's tables, in
plain types (`tensors.pt`, written by torch.save, whose records are 64-byte aligned, and read back with
`torch.load(mmap=True, weights_only=True)`: nothing pickled runs, pages come from the page cache on demand).
`entry.json`, written last, records what the entry was made from and a checksum of the data.

An entry is found by the source's path and the load options; it is used only while the source file is unchanged
(size, modification time and a hash of its first MiB, where a GGUF file keeps its metadata) and was made by the same
code (a hash of the sources that do the conversion, the torch version and the CPU capability that picks kernel
layouts). Anything else, a changed file, a truncated or corrupted entry, is rebuilt with a log line, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("llama3.weights")

FORMAT = 1
_HEADER_BYTES = 1 << 20
_PACKAGE = Path(__file__).resolve().parent.parent
# The sources whose output an entry holds: a change in any of them makes every entry stale.
_CONVERTING_SOURCES = ("weights/gguf.py", "weights/cache.py", "quantize.py", "fast.py", "model.py", "tokenizer.py",
                       "llama.py", "args.py")


def file_identity(path: Path) -> dict:
    st = path.stat()
    with open(path, "rb") as f:
        header = hashlib.sha256(f.read(_HEADER_BYTES)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": header}


def _code_version() -> str:
    h = hashlib.sha256(f"{FORMAT} {torch.__version__} {torch.backends.cpu.get_cpu_capability()}".encode())
    for name in _CONVERTING_SOURCES:
        h.update((_PACKAGE / name).read_bytes())
    return h.hexdigest()


def checksum(path: Path) -> str:
    """A sum of the file's 64-bit words and its size: cheap (memory bandwidth) and catches flipped or lost bytes."""
    data = np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    words = data[:len(data) // 8 * 8].view(np.uint64)
    total = int(words.sum(dtype=np.uint64)) if len(words) else 0
    tail = bytes(data[len(words) * 8:])
    return f"{len(data)}:{total:016x}:{tail.hex()}"


class ConvertedCache:
    """The cache entry of one source file loaded with given options, under `root`."""

    def __init__(self, root: Path, source: Path, options: dict):
        self.source = source.resolve()
        self.options = options
        key = json.dumps({"source": str(self.source), "options": options}, sort_keys=True, default=str)
        self.dir = Path(root) / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _expected(self) -> dict:
        return {"format": FORMAT, "code": _code_version(), "source": str(self.source),
                "options": json.loads(json.dumps(self.options, default=str)), "file": file_identity(self.source)}

    def load(self, restore: Callable[[dict], Any]) -> Any:
        """restore(payload) of a valid entry, or None (no entry, a stale one, or a corrupt one: logged;
        an error raised by `restore` counts as corrupt)."""
        entry = self.dir / "entry.json"
        if not entry.exists():
            return None
        try:
            recorded = json.loads(entry.read_text())
            expected = self._expected()
            stale = [k for k in expected if recorded.get(k) != expected[k]]
            if stale:
                log.info("%s: cached conversion is stale (%s changed); converting again", self.source,
                         ", ".join(stale))
                return None
            if checksum(self.dir / "tensors.pt") != recorded["checksum"]:
                raise ValueError("tensors.pt does not match its checksum")
            return restore(unpack(torch.load(self.dir / "tensors.pt", mmap=True, weights_only=True)))
        except Exception as e:  # noqa: BLE001 - whatever is wrong with an entry, it is rebuilt, never used
            log.warning("%s: cached conversion in %s is corrupt (%s: %s); converting again", self.source, self.dir,
                        type(e).__name__, e)
            return None

    def save(self, payload: dict) -> None:
        """Write an entry (into a fresh directory renamed into place, so readers never see half of one). Skipped,
        with a log line, when it would take more than a quarter of the free disk space."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        packed = pack(payload)  # packed first: walking the unpacked tokenizer tables means ~1M Python objects
        size = sum(t.untyped_storage().nbytes() for t in _tensors(packed))
        free = shutil.disk_usage(self.dir.parent).free
        if size > free // 4:
            log.info("%s: not caching the conversion (%.1f GB, %.1f GB free)", self.source, size / 1e9, free / 1e9)
            return
        _remove_orphans(self.dir.parent)
        expected = self._expected()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir.parent))
        try:
            torch.save(packed, tmp / "tensors.pt")
            expected["checksum"] = checksum(tmp / "tensors.pt")
            (tmp / "entry.json").write_text(json.dumps(expected, indent=1))
            if self.dir.exists():
                shutil.rmtree(self.dir, ignore_errors=True)
            os.rename(tmp, self.dir)
        except OSError as e:  # a full disk or a concurrent writer: the cache is an optimisation, loading goes on
            log.info("%s: could not cache the conversion (%s)", self.source, e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# torch's weights-only unpickler is pure Python: a tokenizer's ~1M strings and ints as Python objects take it tens
# of seconds on a busy machine. Long lists and dicts of them travel as a few tensors instead.
_PACK_ABOVE = 64


def pack(value: Any) -> Any:
    """`value` with its long lists (of ints, of str / bytes / None, of equal-length tuples) and long str- or
    bytes-keyed dicts turned into tensors; `unpack` gives it back."""
    if isinstance(value, dict):
        if len(value) > _PACK_ABOVE and all(isinstance(k, (str, bytes)) for k in value):
            return {"__packed__": "dict", "keys": pack(list(value)), "values": pack(list(value.values()))}
        return {k: pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) > _PACK_ABOVE:
        if all(type(v) is int for v in value):
            return {"__packed__": "ints", "data": torch.tensor(value, dtype=torch.int64)}
        if all(isinstance(v, str) and "\0" not in v for v in value):  # one decode and one split when read
            return {"__packed__": "text", "data": torch.frombuffer(bytearray("\0".join(value).encode()),
                                                                   dtype=torch.uint8)}
        if all(isinstance(v, bytes) for v in value):
            return {"__packed__": "bytes", "lengths": torch.tensor([len(v) for v in value], dtype=torch.int64),
                    "data": torch.frombuffer(bytearray(b"".join(value)) or bytearray(1), dtype=torch.uint8)}
        if all(v is None or isinstance(v, (str, bytes)) for v in value):
            kinds = [0 if v is None else 1 if isinstance(v, str) else 2 for v in value]
            encoded = [b"" if v is None else v.encode() if isinstance(v, str) else v for v in value]
            return {"__packed__": "strings", "kinds": torch.tensor(kinds, dtype=torch.uint8),
                    "lengths": torch.tensor([len(b) for b in encoded], dtype=torch.int64),
                    "data": torch.frombuffer(bytearray(b"".join(encoded)) or bytearray(1), dtype=torch.uint8)}
        if all(isinstance(v, tuple) for v in value) and len({len(v) for v in value}) == 1:
            return {"__packed__": "tuples", "columns": [pack(list(c)) for c in zip(*value)]}
    if isinstance(value, (list, tuple)):
        return type(value)(pack(v) for v in value)
    return value


def unpack(value: Any) -> Any:
    if isinstance(value, dict):
        kind = value.get("__packed__")
        if kind == "dict":
            return dict(zip(unpack(value["keys"]), unpack(value["values"])))
        if kind == "ints":
            return value["data"].tolist()
        if kind == "text":
            return value["data"].numpy().tobytes().decode().split("\0")
        if kind == "bytes":
            data, ends = value["data"].numpy().tobytes(), np.cumsum(value["lengths"].numpy()).tolist()
            return [data[start:end] for start, end in zip([0] + ends[:-1], ends)]
        if kind == "strings":
            data, ends = value["data"].numpy().tobytes(), np.cumsum(value["lengths"].numpy()).tolist()
            out, start = [], 0
            for kind_of, end in zip(value["kinds"].tolist(), ends):
                piece = data[start:end]
                out.append(None if kind_of == 0 else piece.decode() if kind_of == 1 else piece)
                start = end
            return out
        if kind == "tuples":
            return list(zip(*(unpack(c) for c in value["columns"])))
        return {k: unpack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(unpack(v) for v in value)
    return value


def _remove_orphans(root: Path) -> None:
    """Entries whose source file is gone (a deleted or moved download, a temporary file) only take disk space."""
    for entry in root.glob("*/entry.json"):
        try:
            source = Path(json.loads(entry.read_text())["source"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or damaged: its own load rebuilds it
        if not source.exists():
            shutil.rmtree(entry.parent, ignore_errors=True)


def _tensors(payload):
    if isinstance(payload, torch.Tensor):
        yield payload
    elif isinstance(payload, dict):
        for v in payload.values():
            yield from _tensors(v)
    elif isinstance(payload, (list, tuple)):
        for v in payload:
            yield from _tensors(v)
