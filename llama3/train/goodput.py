"""Goodput: the share of wall time that went into training steps that count, restarts and stalls included.

Productive time is the summed time of the optimizer steps on the final trajectory. It travels inside the
checkpoint, so the work lost to a crash or a rollback (steps after the checkpoint that had to be redone) drops out
by itself. Wall time runs from the first start of the run directory, across every restart, to now; it therefore
holds process start-up, checkpoint loads and saves, validation, skipped steps and the time torchrun took to notice
and restart a failure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class Goodput:
    def __init__(self, run_dir: Path, write: bool):
        """`write`: this process keeps the record (rank 0)."""
        self.path, self.write = run_dir / "goodput.json", write
        self.productive_s = 0.0  # restored from the checkpoint on resume
        self.record = json.loads(self.path.read_text()) if self.path.exists() else {}
        if write:
            self.record.setdefault("first_start", time.time())
            self.record["starts"] = self.record.get("starts", 0) + 1
            self.record.setdefault("rollbacks", 0)
            self._save()

    def add_step(self, seconds: float) -> None:
        self.productive_s += seconds

    def rollback(self) -> None:
        if self.write:
            self.record["rollbacks"] += 1
            self._save()

    def summary(self, checkpoint_stall_s: float) -> dict:
        wall = time.time() - self.record.get("first_start", time.time())
        out = {"goodput": self.productive_s / wall if wall > 0 else 0.0, "productive_s": self.productive_s,
               "wall_s": wall, "restarts": self.record.get("starts", 1) - 1,
               "rollbacks": self.record.get("rollbacks", 0), "checkpoint_stall_s_this_start": checkpoint_stall_s}
        if self.write:
            self.record["summary"] = out
            self._save()
        return out

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        tmp.replace(self.path)
