"""Training checkpoints with torch.distributed.checkpoint (DCP), and the final export in `llama3.load`'s format.

A training checkpoint is a directory `step-NNNNNNNN` holding everything needed to continue exactly: model and
optimizer state (each rank writes its own shards under the unsharded model's names, so they load into another
tensor / pipeline / FSDP layout), learning-rate schedule and data position (which needs the same number of
data-parallel ranks). DCP writes `.metadata` last, so a directory without it is an interrupted save and is ignored.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

_STEP_DIR = re.compile(r"step-(\d+)$")


class ModelState(Stateful):
    """The model parts of this rank (one, or several pipeline stages) as one state dict in the model's names."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict:
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    """One optimizer per model part; flattened state dicts ("state.<param>.exp_avg", ...) so the parts merge."""

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.parts, self.optimizers = parts, optimizers
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict:
        return {k: v for part, opt in zip(self.parts, self.optimizers)
                for k, v in get_optimizer_state_dict(part, opt, options=self.options).items()}

    def load_state_dict(self, state: dict) -> None:
        for part, opt in zip(self.parts, self.optimizers):
            set_optimizer_state_dict(part, opt, state, options=self.options)


class Checkpointer:
    """Saves and finds the training checkpoints of one run directory; keeps the newest `keep`."""

    def __init__(self, directory: Path, state: dict[str, Stateful], keep: int = 2):
        self.directory, self.state, self.keep = directory, state, keep

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def complete_steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.directory.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").exists()]
        return sorted(steps)

    def save(self, step: int) -> Path:
        path = self.path(step)
        with _single_process_is_fine():
            dcp.save(self.state, checkpoint_id=path)
        if is_rank0():
            for old in self.complete_steps()[:-self.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        return path

    def load_latest(self) -> int | None:
        """Restore the newest complete checkpoint; its step, or None when there is none."""
        steps = self.complete_steps()
        if dist.is_initialized():  # every rank must agree on the step, even if a directory listing raced a save
            steps = broadcast_object(steps)
        if not steps:
            return None
        with _single_process_is_fine():
            dcp.load(self.state, checkpoint_id=self.path(steps[-1]))
        return steps[-1]


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


def full_model_state_dict(parts: list[nn.Module], *, gather_pipeline: bool, contribute: bool = True
                          ) -> dict[str, torch.Tensor]:
    """The whole unsharded model on rank 0 (CPU tensors; empty on the other ranks).

    FSDP and TP shards are gathered by DCP's state-dict helpers within each pipeline stage; with pipeline
    parallelism the stages' dicts are then collected onto rank 0, sent by one `contribute`-ing rank per stage."""
    state = {}
    for part in parts:
        full = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
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
