"""Fault detection for training, and the injector that proves recovery works.

Detection: `LossGuard` (non-finite loss or gradient norm, loss spikes by z-score), `Watchdog` (a step or save that
takes too long: dump every thread's stack, exit non-zero so torchrun restarts the job) and `replica_mismatch`
(data-parallel replicas must hold bit-identical parameters; a flipped bit shows up as a different fingerprint).
The trainer decides what to do about each (trainer.py: skip, roll back, exit); docs/RELIABILITY.md has the table.

Injection: `FaultInjector` reads specs like "kill:step=7:rank=1" from faults.inject or $LLAMA3_FAULTS. Each fault
fires once per rank: before acting it leaves a marker file in <run dir>/faults/, so the job torchrun restarts, or
the steps replayed after a rollback, do not fire it again.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .config import parse_faults

HANG_EXIT_CODE = 3


class FaultInjector:
    def __init__(self, specs: list[str], run_dir: Path, rank: int):
        env = [s for s in os.environ.get("LLAMA3_FAULTS", "").split(",") if s.strip()]
        self.faults = parse_faults(list(specs) + env, key="faults.inject / LLAMA3_FAULTS")
        self.marker_dir, self.rank = run_dir / "faults", rank

    def due(self, kind: str, step: int) -> bool:
        """True (once) when a fault of `kind` is set for this step on this rank; records that it fired."""
        for i, f in enumerate(self.faults):
            if f.kind != kind or f.step != step or f.rank not in (None, self.rank):
                continue
            marker = self.marker_dir / f"fired-{i}-{kind}-step{step}-rank{self.rank}"
            if marker.exists():
                continue
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            with open(marker, "w") as fh:  # durable before the fault: a killed process must not fire it again
                fh.write(f"{time.time()}\n")
                fh.flush()
                os.fsync(fh.fileno())
            print(f"[fault injection] rank {self.rank}: {kind} before step {step}", file=sys.stderr, flush=True)
            return True
        return False

    def before_step(self, step: int, trainer) -> None:
        """The faults that strike from outside the step: process death, a hang, storage and memory corruption."""
        if self.due("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.due("hang", step):
            while True:  # a rank stuck forever (deadlocked collective, dead NIC): only the watchdog gets it out
                time.sleep(60)
        if self.due("corrupt_checkpoint", step):
            trainer.checkpointer.wait()
            steps = trainer.checkpointer.complete_steps()
            if steps:
                corrupt_file(trainer.checkpointer.path(steps[-1]))
            os.kill(os.getpid(), signal.SIGKILL)  # the restart must notice the damage
        if self.due("bitflip", step):
            flip_bit(trainer.parts)
        if self.due("fail_save", step):
            trainer.checkpointer.fail_next_save = True


def corrupt_file(checkpoint: Path) -> Path:
    """Flip one byte in the middle of the checkpoint's largest data file, as a bad disk or copy would."""
    target = max((f for f in checkpoint.rglob("*.distcp")), key=lambda f: f.stat().st_size)
    with open(target, "r+b") as f:
        f.seek(target.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return target


def local_tensors(parts: list[nn.Module]) -> list[torch.Tensor]:
    """This rank's shards of the trained parameters: what a checkpoint holds, so what a rollback can restore."""
    return [p.to_local() if isinstance(p, DTensor) else p for part in parts for p in part.parameters()
            if p.requires_grad]


@torch.no_grad()
def flip_bit(parts: list[nn.Module], bit: int = 20) -> None:
    """Silent data corruption: flip one mantissa bit of this rank's first parameter element (no NaN, no crash)."""
    t = local_tensors(parts)[0]
    bits = t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)
    bits.view(-1)[0] ^= 1 << (bit if t.dtype == torch.float32 else 8)


@torch.no_grad()
def parameter_fingerprint(parts: list[nn.Module]) -> int:
    """An exact fingerprint of this rank's parameters: the integer sum of their bit patterns, weighted by position
    in the list. Any single flipped bit changes it; cheap enough to run every few steps."""
    total = 0
    for i, t in enumerate(local_tensors(parts)):
        bits = t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)
        total += (i + 1) * int(bits.to(torch.int64).sum())
    return total


def replica_mismatch(parts: list[nn.Module], group) -> list[int]:
    """The global ranks in `group` (data-parallel replicas, which must hold equal parameters) whose fingerprint
    differs from the majority; with two replicas both are named. Empty when all agree."""
    mine = parameter_fingerprint(parts)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return off_the_majority(dict(zip(dist.get_process_group_ranks(group), everyone)))


def off_the_majority(fingerprints: dict[int, int]) -> list[int]:
    """The replicas (by rank) whose fingerprint differs from the majority's; all of them on a tie."""
    counts = Counter(fingerprints.values())
    if len(counts) <= 1:
        return []
    majority, n = counts.most_common(1)[0]
    tie = list(counts.values()).count(n) > 1
    return [r for r, fp in fingerprints.items() if tie or fp != majority]


class LossGuard:
    """Judges each step before the optimizer applies it: a non-finite loss or gradient norm, or (when enabled) a
    loss more than `zscore` standard deviations above the mean of the last `window` good steps, is bad."""

    def __init__(self, zscore: float = 0.0, window: int = 50):
        self.zscore, self.recent = zscore, deque(maxlen=window)
        self.bad_in_a_row = 0

    def check(self, loss: float, grad_norm: float) -> str | None:
        problem = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            problem = f"non-finite loss {loss} or gradient norm {grad_norm}"
        elif self.zscore > 0 and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
            if loss > mean + self.zscore * max(std, 1e-6):
                problem = f"loss spike {loss:.4f} (mean {mean:.4f}, std {std:.4f} over {len(self.recent)} steps)"
        if problem is None:
            self.recent.append(loss)
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
        return problem

    def reset(self) -> None:
        self.recent.clear()
        self.bad_in_a_row = 0


def start_watchdog(cfg, run_dir: str | None, on_fire=None) -> "Watchdog | None":
    """The watchdog from the very start of a process (`cfg`: FaultsConfig), so that the rendezvous, the process
    group, the model build and the checkpoint load are watched as well as the steps; None when both budgets are
    off. Its first phases run before the run directory is known: the dump goes there if run.dir is set."""
    if cfg.watchdog_timeout_s <= 0 and cfg.startup_timeout_s <= 0:
        return None
    rank = int(os.environ.get("RANK", 0))
    return Watchdog(cfg.startup_timeout_s, Path(run_dir) / f"hang-rank{rank}.txt" if run_dir else None, on_fire)


class Watchdog:
    """A thread that expects `beat()` at least every `timeout` seconds. When a step, a collective, the rendezvous or
    a checkpoint load hangs it writes every thread's stack to stderr and <run dir>/hang-rank<R>.txt, calls
    `on_fire(message, waited_s, what)` (the event record) and ends the process with HANG_EXIT_CODE, so that torchrun
    restarts the job from the latest checkpoint. Each beat may set the budget for the phase it starts (start-up
    phases get their own); a budget of 0 means no limit for that phase."""

    def __init__(self, timeout: float, dump_path: Path | None, on_fire=None):
        self.timeout, self.dump_path, self.on_fire = timeout, dump_path, on_fire
        self.last = time.monotonic()
        self.what = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str, timeout: float | None = None) -> None:
        self.last, self.what = time.monotonic(), what
        if timeout is not None:
            self.timeout = timeout

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 10) if self.timeout > 0 else 1.0):
            waited = time.monotonic() - self.last
            if self.timeout > 0 and waited > self.timeout:
                message = f"watchdog: no progress for {waited:.0f}s (> {self.timeout:g}s) in {self.what}; exiting\n"
                sys.stderr.write(message)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                if self.dump_path is not None:
                    self.dump_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.dump_path, "w") as f:
                        f.write(message)
                        faulthandler.dump_traceback(file=f, all_threads=True)
                sys.stderr.flush()
                if self.on_fire is not None:
                    try:
                        self.on_fire(message.strip(), waited, self.what)
                    except Exception as e:  # the record is best effort: exiting is what matters
                        sys.stderr.write(f"watchdog: could not record the hang: {e}\n")
                os._exit(HANG_EXIT_CODE)

    def stop(self) -> None:
        self._stop.set()
