"""Training checkpoints with torch.distributed.checkpoint (DCP), and the final export in `llama3.load`'s format.

A training checkpoint is a directory `step-NNNNNNNN` holding everything needed to continue exactly: model and
optimizer state (each rank writes its own shards under the unsharded model's names, so they load into another
tensor / pipeline / FSDP layout), learning-rate schedule, data position (which needs the same number of
data-parallel ranks) and every rank's random generators, plus a `manifest.json` of checksums. See `Checkpointer`
for how a save commits atomically.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import numpy as np

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: name it to catch it
from torch.distributed.checkpoint.stateful import Stateful

_STEP_DIR = re.compile(r"step-(\d+)$")
MANIFEST = "manifest.json"


class ModelState(Stateful):
    """The trained tensors of this rank's model parts (one, or several pipeline stages) as one state dict in the
    model's names: every parameter in pretraining and full fine-tuning, only the adapters over a frozen base, so
    that a LoRA checkpoint holds megabytes. Buffers (a 4-bit base's codes) come from the base, not from here."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict:
        return {k: v for part in self.parts for k, v in trained_state_dict(part).items()}

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(strict=False))


def trained_state_dict(model: nn.Module, options: StateDictOptions | None = None) -> dict:
    options = options or StateDictOptions()
    state = get_model_state_dict(model, options=StateDictOptions(**{**vars(options), "ignore_frozen_params": True}))
    # buffer names as state dicts give them: without activation checkpointing's wrapper
    buffers = {n.replace("_checkpoint_wrapped_module.", "") for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k not in buffers}


class OptimizerState(Stateful):
    """One optimizer per model part; flattened state dicts ("state.<param>.exp_avg", ...) so the parts merge."""

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.parts, self.optimizers = parts, optimizers
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict:
        # DCP fills an optimizer that has not stepped yet with a zero step (Adam's step count becomes 1), which
        # would change every later update: such an optimizer is handed back as it was.
        fresh = [opt for opt in self.optimizers if not opt.state]
        state = {k: v for part, opt in zip(self.parts, self.optimizers)
                 for k, v in get_optimizer_state_dict(part, opt, options=self.options).items()}
        for opt in fresh:
            opt.state.clear()
        return state

    def load_state_dict(self, state: dict) -> None:
        for part, opt in zip(self.parts, self.optimizers):
            set_optimizer_state_dict(part, opt, state, options=self.options)


class RNGState(Stateful):
    """This rank's random-number generators (torch CPU, CUDA, numpy, Python), saved under a per-rank key so that
    ranks with different streams each get their own back."""

    def __init__(self, rank: int):
        self.key = f"rank{rank}"

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return {self.key: state}

    def load_state_dict(self, state: dict) -> None:
        mine = state[self.key]
        torch.set_rng_state(mine["torch"])
        np.random.set_state(mine["numpy"])
        random.setstate(mine["python"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])


class CheckpointMismatch(ValueError):
    """A checkpoint that is valid but was written under a configuration this run cannot continue (e.g. another
    number of data-parallel ranks for the data position)."""


class SaveFailed(OSError):
    """A checkpoint could not be written; the previous checkpoints are untouched."""


class Checkpointer:
    """Saves and finds the training checkpoints of one run directory; keeps the newest `keep`.

    A save is atomic: DCP writes into `.tmp-step-N`; once every rank's shards are on disk (rank 0's save returns
    only after all ranks reported), rank 0 fsyncs the files, writes `manifest.json` with each file's size and
    sha256, renames the directory to `step-N` and only then points `latest` at it. A directory counts as a
    checkpoint only with a manifest whose checksums match, so a kill at any moment, a partial copy or a flipped
    byte never passes for a valid checkpoint. With `async_save`, DCP stages the state in memory and writes it from
    a background thread while training goes on; the commit happens when the write is done.
    """

    def __init__(self, directory: Path, state: dict[str, Stateful], keep: int = 2, async_save: bool = False,
                 log=None):
        """`log(message, **fields)`: where faults go (the trainer's event record; default: print)."""
        self.directory, self.state, self.keep, self.async_save = directory, state, keep, async_save
        self.log = log or (lambda message, **fields: print(message))
        self.pending: tuple[int, Future] | None = None
        self.fail_next_save = False  # set by the fault injector: the next save's storage write raises
        self.stall_s = 0.0  # time the training loop spent blocked on checkpointing
        self.last_save_s: float | None = None  # how long the last save blocked the loop (the Young/Daly cost)
        self._group = None
        if dist.is_initialized() and async_save:
            # the background writer's collectives get their own group so they never interleave with training's
            self._group = dist.new_group(backend="gloo")

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def complete_steps(self) -> list[int]:
        """Steps of committed checkpoints (directory renamed into place with a manifest); checksums not verified."""
        if not self.directory.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.directory.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).exists()]
        return sorted(steps)

    # ---- saving --------------------------------------------------------------------------------------------------

    def save(self, step: int, *, block: bool = False) -> bool:
        """Write the checkpoint of `step`. A failure (disk full, no permission) is logged and training goes on:
        returns False then. With async saves, returns once the state is staged; `wait()` commits."""
        start = time.perf_counter()
        try:
            self.wait()  # one save in flight at a time
            tmp = self.directory / f".tmp-step-{step:08d}"
            if is_rank0():
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            if dist.is_initialized():
                dist.barrier()
            writer = _InjectableWriter(tmp, fail=self.fail_next_save)
            self.fail_next_save = False
            with _single_process_is_fine():
                if self.async_save and not block:
                    self.pending = (step, dcp.async_save(self.state, storage_writer=writer,
                                                         process_group=self._group))
                else:
                    dcp.save(self.state, storage_writer=writer)
                    self._commit(step)
            return True
        except (Exception, CheckpointException) as e:  # any storage error: keep training on the previous checkpoint
            self._failed(step, e)
            return False
        finally:
            self.last_save_s = time.perf_counter() - start
            self.stall_s += self.last_save_s

    def wait(self) -> None:
        """Finish the save in flight, if any, and commit it."""
        if self.pending is None:
            return
        step, future = self.pending
        self.pending = None
        start = time.perf_counter()
        try:
            future.result()
            self._commit(step)
        except (Exception, CheckpointException) as e:
            self._failed(step, e)
        finally:
            self.stall_s += time.perf_counter() - start

    def _commit(self, step: int) -> None:
        if is_rank0():
            tmp, final = self.directory / f".tmp-step-{step:08d}", self.path(step)
            manifest = {"step": step, "files": {}}
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                    manifest["files"][str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)  # a stale or corrupt copy of the same step
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            _write_durably(self.directory / "latest", final.name + "\n")
            for old in self.complete_steps()[:-self.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    def _failed(self, step: int, error: Exception) -> None:
        self.log(f"checkpoint of step {step} failed ({type(error).__name__}: {_first_line(error)}); "
                 f"training continues, the previous checkpoint stays", event="fault", kind="save_failed", step=step)
        if is_rank0():
            shutil.rmtree(self.directory / f".tmp-step-{step:08d}", ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------------------------------

    def verify(self, step: int) -> str | None:
        """Why checkpoint `step` is not valid (missing or changed file, no manifest), or None when it is."""
        path = self.path(step)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"unreadable manifest ({e})"
        for name, expected in manifest["files"].items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != expected["bytes"] or _sha256(f) != expected["sha256"]:
                return f"{name} does not match its checksum"
        return None

    def load_latest(self) -> int | None:
        """Restore the newest valid checkpoint; its step, or None when there is none. Checkpoints that fail their
        checksums are renamed `corrupt-step-N` (kept for inspection, never loaded) and the previous one is tried."""
        self.wait()
        while True:
            step = self.newest_valid_step()
            if step is None:
                return None
            try:
                self._load(self.path(step))
                return step
            except CheckpointMismatch:  # a valid checkpoint of another configuration: not corrupt, not ours to skip
                raise
            except (Exception, CheckpointException) as e:  # e.g. a file DCP cannot parse despite its checksum
                if "Missing key in checkpoint" in _first_line(e):  # intact, but holds other state than this run's
                    raise CheckpointMismatch(
                        f"{self.path(step)}: this checkpoint cannot be continued by this version or configuration "
                        f"({_first_line(e)}); start a new run directory or set checkpoint.resume=false") from None
                self._quarantine(step, f"load failed: {_first_line(e)}")

    def _load(self, path: Path) -> None:
        """Everything but the random generators must be in the checkpoint. Those are per rank: a run with more
        ranks than the one that saved finds none for its extra ranks, which keep their fresh ones."""
        core = {k: v for k, v in self.state.items() if k != "rng"}
        with _single_process_is_fine():
            dcp.load(core, checkpoint_id=path)
            rng = self.state.get("rng")
            if rng is not None:
                saved = FileSystemReader(path).read_metadata().state_dict_metadata
                has_mine = any(key.startswith(f"rng.{rng.key}.") for key in saved)
                dcp.load({"rng": rng if has_mine else {}}, checkpoint_id=path)  # collective: every rank takes part

    def newest_valid_step(self) -> int | None:
        """Rank 0 checks the checksums (one reader of the shared directory) and tells the others."""
        step = None
        if is_rank0():
            for candidate in reversed(self.complete_steps()):
                problem = self.verify(candidate)
                if problem is None:
                    step = candidate
                    break
                self._quarantine(candidate, problem)
        if dist.is_initialized():
            step = broadcast_object(step)
        return step

    def _quarantine(self, step: int, reason: str) -> None:
        self.log(f"checkpoint {self.path(step)} is not valid ({reason}); using the previous one", event="fault",
                 kind="corrupt_checkpoint", checkpoint=self.path(step).name, step=step)
        if is_rank0():
            os.replace(self.path(step), self.directory / f"corrupt-step-{step:08d}")


class MemoryCheckpoint:
    """The newest training state as a copy in this process's RAM (model, optimizer, schedule, data position, RNGs),
    so that a rollback after a NaN or silent corruption restores it without touching the disk. With FSDP/TP each
    rank copies only its own shards, so the copy costs what the rank's state does."""

    def __init__(self, state: dict[str, Stateful]):
        self.state = state
        self.step: int | None = None
        self._saved: dict | None = None

    def save(self, step: int) -> None:
        self._saved = {k: copy.deepcopy(v.state_dict()) for k, v in self.state.items()}
        self.step = step

    def load(self) -> int | None:
        """Restore the copy (it stays valid for another rollback); its step, or None when there is none."""
        if self._saved is None:
            return None
        for k, v in self.state.items():
            v.load_state_dict(copy.deepcopy(self._saved[k]))
        return self.step


def young_daly_interval_s(save_cost_s: float, mtbf_s: float) -> float:
    """The checkpoint interval that loses the least time to saves plus recomputation after a fault: Young's
    first-order optimum sqrt(2 x save cost x mean time between faults) (Daly's refinement differs when the save
    cost approaches the MTBF; then checkpointing cannot keep up anyway)."""
    if save_cost_s < 0 or mtbf_s <= 0:
        raise ValueError(f"save cost {save_cost_s}s and mean time between faults {mtbf_s}s must be positive")
    return math.sqrt(2 * save_cost_s * mtbf_s)


class _InjectableWriter(FileSystemWriter):
    """DCP's file writer, with a switch that makes its write fail like a full disk (for fault injection)."""

    def __init__(self, path: Path, fail: bool):
        super().__init__(path)
        self.fail = fail

    def write_data(self, plan, planner):
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return super().write_data(plan, planner)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_durably(path: Path, text: str) -> None:
    """Write, flush and fsync a small file under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(error: BaseException) -> str:
    if isinstance(error, CheckpointException) and error.failures:  # the ranks' own errors, not DCP's wrapper
        rank, cause = next(iter(error.failures.items()))
        return f"rank {rank}: {type(cause).__name__}: {_first_line(cause)}"
    return (str(error).strip().splitlines() or [""])[0][:200]


@contextlib.contextmanager
def _single_process_is_fine():
    """DCP warns when there is no process group; one process is a normal way to train here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_model_state_dict(parts: list[nn.Module], *, gather_pipeline: bool, contribute: bool = True,
                          trained_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole unsharded model (or only its trained tensors) on rank 0 as CPU tensors; empty on the other ranks.

    FSDP and TP shards are gathered by DCP's state-dict helpers within each pipeline stage; with pipeline
    parallelism the stages' dicts are then collected onto rank 0, sent by one `contribute`-ing rank per stage."""
    state = {}
    # cpu_offload keeps the gathered tensors on global rank 0 only; a later stage's dict must come from its own
    # ranks, so pipelines gather on the device (the stage's unsharded weights, which pipelined training holds
    # between micro-batches anyway) and move each tensor to the CPU here.
    options = StateDictOptions(full_state_dict=True, cpu_offload=not gather_pipeline)
    for part in parts:
        full = trained_state_dict(part, options) if trained_only else get_model_state_dict(part, options=options)
        state.update({k: v.detach().cpu() for k, v in full.items()})
    if not gather_pipeline:
        return state if is_rank0() else {}
    gathered = [None] * dist.get_world_size() if is_rank0() else None
    dist.gather_object(state if contribute else {}, gathered, dst=0)
    if not is_rank0():
        return {}
    merged = {}
    for d in gathered:
        merged.update(d)
    return merged
