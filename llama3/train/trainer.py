"""The training loop, once for pretraining and fine-tuning: optimizer and schedule, parallel layouts, validation,
metrics and goodput, checkpoints and fault handling.

What differs between pretraining, SFT and DPO is a `Task` plugged in (pretrain.py, llama3/finetune/tasks.py): the
model with its transform (none, LoRA, QLoRA) applied before parallelization, the data and its collation into
`Batch`es, the objective, the FLOP count and the export. One process or many (launched by torchrun): the parallel
layout comes from the config and is applied to the model from outside (parallelize.py, pipeline.py); the loop
itself only knows whether it drives a pipeline schedule or a plain forward/backward.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from ..args import ModelArgs
from .checkpoint import (CheckpointMismatch, Checkpointer, MemoryCheckpoint, ModelState, OptimizerState, RNGState,
                         broadcast_object, full_model_state_dict, is_rank0, young_daly_interval_s)
from .config import ConfigError, Layout, LoopConfig, OptimConfig, resolve_layout
from .data import IGNORE, document_mask
from .events import EventLog, process_age_s, read_events, restart_faults
from .faults import (HANG_EXIT_CODE, FaultInjector, LossGuard, off_the_majority, parameter_fingerprint,
                     replica_mismatch, start_watchdog)
from .goodput import Goodput
from .metrics import MetricsWriter, measure_peak_flops, peak_memory_gib, plot_losses, reset_peak_memory, synchronize
from .network import check_multihost_settings
from .parallelize import build_mesh, parallelize


def lr_multiplier(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of optim.lr: linear warmup, then cosine
    decay to min_lr_ratio, or warmup-stable-decay (constant, then linear decay over the last decay_ratio)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "cosine":
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_steps = max(1, round(optim.decay_ratio * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW, fused (one pass over memory per step: on CPU ~1.4x faster than foreach); weight decay on matrices
    only, not on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # adapters are all matrices; DCP cannot restore an empty group
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)


UNCOMMITTED = "the quorum did not commit the step"


def plain(t: Tensor) -> Tensor:
    """A DTensor's full value as a regular tensor (loss and norms are DTensors under tensor parallelism)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def init_distributed(device_choice: str) -> tuple[torch.device, bool]:
    """Pick the device and, under torchrun, join the process group. Returns (device, distributed)."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no CUDA device is available")
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        check_multihost_settings(gloo=not use_cuda)
        store, rank, world_size = restart_scoped_store()
        if use_cuda:
            dist.init_process_group("nccl", device_id=device, store=store, rank=rank, world_size=world_size)
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    return device, distributed


def restart_scoped_store() -> tuple[dist.Store, int, int]:
    """torchrun keeps one key-value store across the restarts of a job. Scope this attempt's keys by the restart
    count: otherwise the new ranks read the addresses the previous attempt's (dead) ranks left there and gloo
    fails to connect."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_hosts_it and rank == 0, timeout=timedelta(minutes=10))
    if not agent_hosts_it:  # rank 0 hosts a fresh store for every attempt: nothing stale in it
        return store, rank, world_size
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store), rank, world_size


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The training dtype: "auto" is bf16 on GPU and fp32 on CPU (bf16 matmuls are slower than fp32 there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def create_run_dir(name: str, config: dict, distributed: bool) -> Path:
    """The run directory, with config.json written by rank 0. The ranks may start a second apart, so a name made
    from the time is rank 0's."""
    if distributed:
        name = broadcast_object(name)
    path = Path(name)
    if is_rank0():
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


@dataclass
class Batch:
    """One micro-batch as the model sees it, each (B, T): inputs, targets (IGNORE where nothing is learned: prompts,
    padding) and each token's position (restarting at each document of a packed row)."""
    inputs: Tensor
    targets: Tensor
    positions: Tensor
    tokens: int  # real tokens read, padding excluded (for throughput)

    def to(self, device: torch.device) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.positions.to(device), self.tokens)


class NextTokenLoss:
    """Pretraining's and SFT's objective: the cross-entropy of every learned target, summed. SFT's prompt masking
    is only labels: targets IGNORE are context. Runs with the logits sharded over the vocabulary (loss parallel)
    and in a pipeline's last stage."""

    loss_parallel = True

    @staticmethod
    def count(batch: Batch) -> int:
        """What the loss averages over: learned tokens."""
        return int((batch.targets != IGNORE).sum())

    def loss(self, forward, batch: Batch) -> tuple[Tensor, dict]:
        return self.sum(forward(batch), batch.targets), {}

    @staticmethod
    def sum(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=IGNORE,
                               reduction="sum")


class Task(Protocol):
    """What the loop is told by the kind of training it runs (pretrain.py, llama3/finetune/tasks.py).

    build_model(device, dtype): the whole model with its starting weights and its transform (LoRA, a 4-bit base)
    applied, before parallelization. build_data(layout, dp_rank): sets train_data, an endless iterator of raw
    micro-batches for this data-parallel rank with state_dict / load_state_dict. val_batches(): the raw
    micro-batches of one validation, the same every time, as (raw, counts) pairs (counts False: a batch that only
    keeps this rank in step with the others). collate(raw) -> Batch. flops_per_token(mean row length) for MFU.
    describe(trainer) -> what is trained. export(trainer) -> where the result was written (rank 0)."""

    args: ModelArgs
    tokenizer: object  # shipped with the export; None for synthetic data
    objective: NextTokenLoss  # or DPOLoss: count(batch), loss(forward, batch) -> (summed loss, summed statistics)
    document_masking: bool  # attention stays inside each document of a row (the positions restart)
    train_data: object

    def default_run_dir(self) -> str: ...
    def build_model(self, device: torch.device, dtype: torch.dtype) -> nn.Module: ...
    def build_data(self, layout: Layout, dp_rank: int) -> None: ...
    def val_batches(self): ...
    def collate(self, raw) -> Batch: ...
    def flops_per_token(self, seq_len: float) -> float: ...
    def describe(self, trainer: Trainer) -> str: ...
    def export(self, trainer: Trainer) -> Path | None: ...


class Trainer:
    def __init__(self, cfg: LoopConfig, task: Task):
        self.cfg = cfg
        self.task, self.objective = task, task.objective
        self.events: EventLog | None = None  # the fault record, once the run directory exists
        self.startup = {"imports": process_age_s()}  # the cold start, itemised in the start line
        self.phase, self.phase_began = None, time.monotonic()
        self.watchdog = start_watchdog(cfg.faults, cfg.run.dir, on_fire=self.record_hang)
        self.beat("rendezvous and process group creation", startup=True)
        self.device, self.distributed = init_distributed(cfg.run.device)
        # a torchft replica group (ft.py): its own process, in step with the other groups through the quorum
        self.ft = None
        ft_group = bool(cfg.ft.replicas)
        if ft_group and (self.distributed or cfg.ft.replica_id is None):
            raise ConfigError("ft.replicas: each replica group is one process with its ft.replica_id; start them "
                              "with `llama3 train ft.replicas=N` (which may itself run under torchrun)")
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.dtype = resolve_dtype(cfg.training.dtype, self.device)
        self.run_dir = create_run_dir(cfg.run.dir or task.default_run_dir(), cfg.to_dict(), self.distributed)
        self.rank = dist.get_rank() if self.distributed else (cfg.ft.replica_id or 0)
        if self.watchdog is not None:
            self.watchdog.dump_path = self.run_dir / f"hang-rank{self.rank}.txt"
        self.events = EventLog(self.run_dir, self.rank)
        self.events.leads = self.events.leads or ft_group  # each group records its own start
        previous = self.events.take_previous_statuses(own_only=ft_group) if is_rank0() else []
        if self.distributed:  # rank 0 has read the previous start's statuses before anyone overwrites them
            broadcast_object(None)
            self.events.record_termination()
        self.beat("model build", startup=True)

        model = task.build_model(self.device, self.dtype)
        self.args: ModelArgs = task.args
        # replica groups split each global batch like data-parallel ranks
        self.layout = layout = resolve_layout(cfg, cfg.ft.replicas or self.world_size, self.args)
        self.mesh = build_mesh(layout, self.device.type) if self.distributed else None
        self.pipelined = layout.pp > 1
        self.loss_parallel = (not self.pipelined and layout.tp > 1 and cfg.parallel.loss_parallel
                              and self.objective.loss_parallel)
        if self.pipelined:
            from .pipeline import build_pipeline  # torch's pipelining pulls in dynamo: ~2 s of imports
            self.n_microbatches = n_micro = cfg.parallel.pp_microbatches or layout.pp
            self.schedule, self.parts, self.has_first, self.has_last = build_pipeline(
                model, self.mesh["pp"], schedule=cfg.parallel.pp_schedule,
                stages_per_rank=cfg.parallel.pp_stages_per_rank, n_microbatches=n_micro,
                loss_fn=self.pipeline_loss, device=self.device, document_masking=task.document_masking,
                parallelize_stage=lambda part: parallelize(part, self.mesh, cfg, param_dtype=self.dtype,
                                                           pipelined=True))
        else:
            self.parts = [parallelize(model, self.mesh, cfg, param_dtype=self.dtype,
                                      loss_parallel=self.loss_parallel)]
            self.has_first = self.has_last = True
        self.loss_scale = 1.0  # what a summed loss is multiplied by before backward (set per step)
        self.optimizers = [build_optimizer(part, cfg.optim) for part in self.parts]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, cfg.optim, cfg.training.steps)) for opt in self.optimizers]

        self.dp_rank = self.rank if ft_group else 0
        if self.mesh is not None:
            self.dp_rank = (self.mesh["dp_replicate"].get_local_rank() * layout.dp_shard
                            + self.mesh["dp_shard"].get_local_rank())
        task.build_data(layout, self.dp_rank)
        self.train_data = task.train_data

        self.step = 0
        self.losses: list[float] = []  # of the steps this process ran
        self.output: Path | None = None  # what the task exported
        self.peak_mem_gib, self.timed_tokens, self.timed_s = 0.0, 0.0, 0.0
        self.val_losses: list[tuple[int, float]] = []  # (step, validation loss)
        self.injector = FaultInjector(cfg.faults.inject, self.run_dir, self.rank)
        self.guard = LossGuard(cfg.faults.spike_zscore, cfg.faults.spike_window)
        self.skip_steps = set(cfg.faults.skip_steps) | self.read_skip_steps()
        self.goodput = Goodput(self.run_dir, write=is_rank0() and self.rank == 0)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", {
            "model": ModelState(self.parts),
            "optimizer": OptimizerState(self.parts, self.optimizers),
            "progress": _Progress(self),
            "rng": RNGState(self.rank)}, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
            log=self.events.note)
        self.memory = MemoryCheckpoint(self.checkpointer.state)
        restarted = restart_faults(self.events, previous, self.world_size) if is_rank0() else []
        self.previous_world = [s["host"] for s in previous]
        self.beat("checkpoint load", startup=True)
        if cfg.checkpoint.enabled and cfg.checkpoint.resume:
            self.step = self.checkpointer.load_latest() or 0
        elif ft_group and cfg.checkpoint.enabled:  # a replacement heals from a peer; it still checks the disk's
            self.checkpointer.newest_valid_step()
        self.faults_before = sum(e["event"] == "fault" for e in read_events(self.run_dir)) if is_rank0() else 0
        self.record_start(restarted)
        if cfg.checkpoint.memory_every and self.step:  # a fresh run's first copy is taken after memory_every steps
            self.memory.save(self.step)

        if cfg.metrics.peak_tflops:
            self.peak_flops = cfg.metrics.peak_tflops * 1e12
        else:
            self.peak_flops = measure_peak_flops(self.device, self.dtype)
        self.writer = MetricsWriter(self.run_dir, tensorboard=cfg.metrics.tensorboard) if is_rank0() else None

    # ---- one step ------------------------------------------------------------------------------------------------

    def pipeline_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.objective.sum(logits, targets) * self.loss_scale

    def autocast(self):
        """Single-process bf16 runs under autocast; distributed ones get bf16 from FSDP's mixed precision."""
        if self.mesh is None and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def forward(self, batch: Batch) -> Tensor:
        """Logits of a micro-batch (not pipelined)."""
        mask = document_mask(batch.positions) if self.task.document_masking else None
        with self.autocast():
            return self.parts[0](batch.inputs, batch.positions, attn_mask=mask)

    def global_sum(self, values: list[float]) -> list[float]:
        """Sum per-rank values over the data-parallel ranks. Tensor-parallel peers hold the same values and only
        last pipeline stages hold them at all, so everyone adds theirs (zero off the last stage) and the total
        is divided by the copies."""
        t = torch.tensor(values if self.has_last else [0.0] * len(values), dtype=torch.float64, device=self.device)
        if self.ft is not None:
            return self.ft.sum(t).tolist()
        if self.distributed:
            dist.all_reduce(t)
            t /= self.layout.tp
        return t.tolist()

    def next_batches(self) -> list[Batch]:
        return [self.task.collate(next(self.train_data)).to(self.device) for _ in range(self.layout.grad_accum)]

    def run_batch(self, batch: Batch, train: bool, stats: dict) -> Tensor:
        """The summed loss of one micro-batch (times loss_scale in a pipeline), with backward when training; its
        statistics are added to `stats`."""
        if self.pipelined:
            losses = []
            args = (batch.inputs, batch.positions) if self.has_first else ()
            fn = self.schedule.step if train else self.schedule.eval
            fn(*args, target=batch.targets if self.has_last else None, losses=losses if self.has_last else None)
            return torch.stack(losses).sum().detach() if self.has_last else torch.zeros((), device=self.device)
        with self.loss_context():
            loss, extra = self.objective.loss(self.forward, batch)
            if train:
                (loss * self.loss_scale).backward()
        for k, v in extra.items():
            stats[k] = stats.get(k, 0.0) + float(v)
        return plain(loss.detach())

    def train_step(self, poison: bool = False) -> tuple[dict, str | None]:
        """One optimizer step over grad_accum micro-batches. The loss is the mean over every learned unit (token,
        or pair for DPO) of the global batch however the layout splits it; returns the step's record (loss, lr,
        grad_norm, tokens, the objective's statistics) and why the step was skipped or None. The loss guard sees
        the step before the optimizer applies it; a skipped step consumes its batch and moves the schedule on,
        but leaves parameters and optimizer alone. `poison` (fault injection) turns the gradients into NaN, as an
        overflow would."""
        data_before = self.train_data.state_dict() if self.ft is not None else None
        batches = self.next_batches()
        # with replica groups, which groups are in this step's quorum too (one slot each)
        present = [float(i == self.rank) for i in range(self.cfg.ft.replicas)] if self.ft is not None else []
        count, tokens, rows, *present = self.global_sum([
            sum(self.objective.count(b) for b in batches), sum(b.tokens for b in batches),
            sum(len(b.inputs) for b in batches), *present])
        self.ft_members = {i for i, v in enumerate(present) if v > 0.5}
        # Data-parallel gradients are averaged over the ranks: scale so that the result is the global mean.
        self.loss_scale = (len(self.ft_members) if self.ft is not None else self.layout.dp) / max(count, 1)
        total, stats = torch.zeros((), device=self.device), {}
        for i, batch in enumerate(batches):
            if self.mesh is not None and not self.pipelined:  # reduce gradients only after the last micro-batch
                self.parts[0].set_requires_gradient_sync(i == len(batches) - 1)
            total += self.run_batch(batch, True, stats)
        if self.pipelined:
            total = total / self.loss_scale
        if poison:
            total = total * float("nan")
            for part in self.parts:
                for p in part.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
        if self.ft is not None:
            self.ft.average_gradients([p for part in self.parts for p in part.parameters()])
        grad_norm = self.clip_gradients()
        keys = sorted(stats)
        sums = self.global_sum([float(total), *(stats[k] for k in keys)])
        record = {"loss": sums[0] / max(count, 1), "lr": self.schedulers[0].get_last_lr()[0], "grad_norm": grad_norm,
                  **{k: v / max(count, 1) for k, v in zip(keys, sums[1:])}, "tokens": tokens, "rows": rows}
        problem = self.guard.check(record["loss"], grad_norm)
        if self.ft is not None and not self.ft.commit():  # a group died or hung in this step: run it again
            self.train_data.load_state_dict(data_before)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            return record, UNCOMMITTED
        for opt, sched in zip(self.optimizers, self.schedulers):
            if problem is None:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return record, problem

    def skip_batch(self) -> None:
        """Consume one step's data and move the schedule on, without computing anything."""
        for _ in range(self.layout.grad_accum):
            next(self.train_data)
        for sched in self.schedulers:
            sched.step()

    def clip_gradients(self) -> float:
        """Clip the global gradient norm (over every shard and pipeline stage) to optim.grad_clip; return it."""
        params = [p for part in self.parts for p in part.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        norm = plain(norm)
        if self.pipelined:  # each stage has the norm of its own parameters
            norm = norm.square()
            dist.all_reduce(norm, group=self.mesh["pp"].get_group())
            norm = norm.sqrt()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, norm, foreach=True)
        return norm.item()

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean loss (and the objective's statistics) over the task's validation batches."""
        for part in self.parts:
            part.eval()
        self.loss_scale = 1.0
        total, count, stats = 0.0, 0, {}
        for raw, counts in self.task.val_batches():
            batch = self.task.collate(raw).to(self.device)
            extra = {}
            loss = self.run_batch(batch, False, extra)
            if counts:
                total, count = total + float(loss), count + self.objective.count(batch)
                for k, v in extra.items():
                    stats[k] = stats.get(k, 0.0) + v
        for part in self.parts:
            part.train()
        keys = sorted(stats)
        total, count, *sums = self.global_sum([total, count, *(stats[k] for k in keys)])
        return {"val_loss": total / max(count, 1), **{f"val_{k}": v / max(count, 1) for k, v in zip(keys, sums)}}

    # ---- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> list[float]:
        """Train to training.steps; returns the per-step losses of this call."""
        cfg = self.cfg
        if self.writer is not None:
            self.writer.print(self.describe())
        if cfg.eval.at_start and cfg.eval.every >= 0 and self.step == 0:
            self.log_validation()
        reset_peak_memory(self.device)
        last_save = time.monotonic()
        if cfg.ft.replicas:
            self.ft_join()
        while self.step < cfg.training.steps:
            if self.ft is not None:
                self.ft_begin_step()
            step = self.step + 1
            self.beat(f"step {step}", step=step)
            self.injector.before_step(step, self)
            if step in self.skip_steps:
                if self.ft is not None and not self.ft.commit():
                    self.ft_failed = self.ft_failed or step
                    continue
                self.skip_batch()
                self.step = step
                self.log(f"step {step}: batch skipped (faults.skip_steps)")
                continue
            start = time.perf_counter()
            record, problem = self.train_step(poison=self.injector.due("nan", step))
            synchronize(self.device)
            elapsed = time.perf_counter() - start
            if problem is UNCOMMITTED:
                self.ft_failed = self.ft_failed or step
                continue
            self.step = step
            if self.ft is not None:
                self.ft_committed(step)
            if problem is not None:
                self.events.fault("non_finite" if problem.startswith("non-finite") else "loss_spike",
                                  f"step {step}: {problem}", step=step, rank="all")
                self.events.action("skip_step", f"step {step} skipped ({self.guard.bad_in_a_row} in a row)",
                                   step=step)
                self.add_skip_steps([step])
                if self.guard.bad_in_a_row >= cfg.faults.max_bad_steps:
                    self.rollback(f"{self.guard.bad_in_a_row} bad steps in a row")
                continue
            self.goodput.add_step(elapsed)
            self.events.productive(self.step)
            self.losses.append(record["loss"])
            self.log_step(record, elapsed)
            last = self.step == cfg.training.steps
            if cfg.eval.every >= 0 and ((cfg.eval.every and self.step % cfg.eval.every == 0) or last):
                self.log_validation()
            save = cfg.checkpoint.enabled and not last and self.checkpoint_due(last_save)
            memory_every = cfg.checkpoint.memory_every
            snapshot = memory_every and (self.step % memory_every == 0 or save)
            every = cfg.faults.fingerprint_every
            if self.ft is not None:
                # one group writes the disk checkpoints, at a step all groups check (the check is collective)
                self.save_wanted = (save or self.save_wanted) and self.events.leads
                snapshot = memory_every and self.step % memory_every == 0
                save = self.save_wanted and (not every or self.step % every == 0 or snapshot)
            if (self.replica_group() is not None or self.ft is not None) and every and (
                    self.step % every == 0 or save or snapshot):
                if self.replicas_disagree():
                    continue
            if snapshot:  # after the fingerprint check: the copy in RAM is one the replicas agreed on
                self.memory.save(self.step)
            if save:
                self.beat(f"checkpoint of step {self.step}")
                self.checkpointer.save(self.step)
                last_save, self.save_wanted = time.monotonic(), False
        self.beat("final checkpoint and export")
        writes = self.ft is None or self.events.leads
        if cfg.checkpoint.enabled and writes:
            self.save_final()
        for part in self.parts:
            part.eval()
        self.output = self.task.export(self) if cfg.checkpoint.export and writes else None
        summary = self.goodput.summary(self.checkpointer.stall_s)
        self.events.write(
            "end", f"goodput {summary['goodput']:.1%}: {summary['productive_s']:.1f}s of productive steps in "
            f"{summary['wall_s']:.1f}s wall time, {summary['restarts']} restart(s), {summary['rollbacks']} "
            f"rollback(s), {self.checkpointer.stall_s:.2f}s blocked on checkpoints since the last start",
            step=self.step, goodput=summary["goodput"], wall_s=summary["wall_s"])
        self.events.set_status("done")
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.writer is not None:
            if cfg.metrics.plot and plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png"):
                self.writer.print(f"loss curve: {self.run_dir / 'loss.png'}")
            self.writer.close()
        return self.losses

    def log_step(self, record: dict, elapsed: float) -> None:
        tokens, rows = record.pop("tokens"), record.pop("rows")
        self.peak_mem_gib = peak_memory_gib(self.device)
        if len(self.losses) > 1:  # the first step pays for warm-up
            self.timed_tokens, self.timed_s = self.timed_tokens + tokens, self.timed_s + elapsed
        if self.writer is None or not self.events.leads or not (
                self.step % self.cfg.training.log_every == 0 or self.step == 1):
            return
        flops = self.task.flops_per_token(tokens / rows) * tokens / elapsed / self.world_size
        self.writer.log({
            "step": self.step, **record, "tokens_per_s": tokens / elapsed,
            "tokens_per_s_per_device": tokens / elapsed / self.world_size,
            "tflops_per_device": flops / 1e12, "mfu": flops / self.peak_flops,
            "peak_mem_gib": self.peak_mem_gib, "step_time_s": elapsed,
            "tokens_seen": self.step * tokens})

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.timed_s if self.timed_s else 0.0

    def log_validation(self) -> None:
        val = self.validate()
        self.val_losses.append((self.step, val["val_loss"]))
        if self.writer is not None:
            self.writer.log({"step": self.step, **val})

    # ---- recovery ------------------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        """Reliability events: on rank 0's stderr and in <run dir>/events.log (events.py)."""
        self.events.note(message)

    def beat(self, what: str, step: int | None = None, startup: bool = False) -> None:
        """Progress: the watchdog's heartbeat (start-up phases have their own budget) and this rank's status."""
        if self.watchdog is not None:
            f = self.cfg.faults
            self.watchdog.beat(what, f.startup_timeout_s if startup else f.watchdog_timeout_s)
        if self.phase_began is not None:  # time the start-up phase that just ended
            now = time.monotonic()
            if self.phase is not None:
                self.startup[self.phase] = now - self.phase_began
            self.phase, self.phase_began = (what.split()[0], now) if startup else (None, None)
        if self.events is not None:
            self.events.set_status("running", step, what)

    def record_hang(self, message: str, waited_s: float, what: str) -> None:
        """The watchdog fired (its thread): each hung rank records itself, since rank 0 may be the one stuck."""
        events = self.events or EventLog(Path(self.cfg.run.dir or "."), int(os.environ.get("RANK", 0)))
        events.set_status("hang", what=what, since=time.time() - waited_s)
        events.fault("hang", message, everyone=True, at=time.time() - waited_s, phase=what)
        events.write("action", f"rank {events.rank} exits with code {HANG_EXIT_CODE} for the launcher to restart "
                     "the job", everyone=True, kind="exit", code=HANG_EXIT_CODE)

    def record_start(self, restarted: list[dict]) -> None:
        """The start line: which attempt, on which hosts, resumed from which checkpoint (or fresh)."""
        hosts = gather_all(self.events.host) if self.distributed else [self.events.host]
        resumed = f"step-{self.step:08d}" if self.step else "fresh"
        if self.cfg.ft.replicas and not self.cfg.checkpoint.resume:
            resumed = "peer"  # a replacement group: it heals from a live peer at its first quorum
        attempt = self.goodput.record.get("starts", 1) - 1
        if restarted:
            self.events.action("restart", f"the {'replica group' if self.cfg.ft.replicas else 'job'} restarted "
                               f"(attempt {attempt}) and resumes from {resumed}", attempt=attempt, resumed=resumed)
        if self.world_size < len(self.previous_world):  # torchrun went on with the hosts that remain (--nnodes)
            gone = sorted(set(self.previous_world) - set(hosts))
            self.events.action("scale_down", f"the job goes on with {self.world_size} of {len(self.previous_world)}"
                               f" processes, without host(s) {', '.join(gone) or '?'}", processes=self.world_size,
                               hosts=",".join(gone))
        self.beat("first step")  # ends the last start-up phase
        phases = {k: round(v, 2) for k, v in self.startup.items()}
        self.events.write("start", f"start {attempt}: {self.world_size} process(es) on "
                          f"{len(set(hosts))} host(s), resuming from {resumed}; start-up "
                          + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()), attempt=attempt,
                          world=self.world_size, hosts=",".join(sorted(set(hosts))), resumed=resumed,
                          launcher_restart=os.environ.get("TORCHELASTIC_RESTART_COUNT"),
                          replica=self.cfg.ft.replica_id, pid=os.getpid(),
                          **{f"{k}_s": v for k, v in phases.items()})

    def minutes_passed(self, since: float, minutes: float) -> bool:
        """Whether a time-based checkpoint is due; rank 0's clock decides for everyone."""
        if minutes <= 0:
            return False
        return self.rank0_decides(time.monotonic() - since >= 60 * minutes)

    def rank0_decides(self, due: bool) -> bool:
        return bool(broadcast_object(due)) if self.distributed else due

    def read_skip_steps(self) -> set[int]:
        path = self.run_dir / "skip_steps.json"
        return set(json.loads(path.read_text())) if path.exists() else set()

    def add_skip_steps(self, steps) -> None:
        """Steps whose batch is skipped from now on, also after a restart or rollback replays them."""
        self.skip_steps.update(steps)
        if is_rank0():  # replica groups each write theirs: a name of its own for the temporary file
            tmp = self.run_dir / f"skip_steps.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(sorted(self.skip_steps)))
            tmp.replace(self.run_dir / "skip_steps.json")

    def save_final(self) -> None:
        """The last steps exist only in memory until this save: a failed one is tried again, and a second failure
        is an error (the run exits non-zero) rather than an "end" line for steps that were not kept."""
        if self.checkpointer.save(self.step, block=True):
            return
        self.events.action("retry", f"the final checkpoint of step {self.step} is written again", step=self.step)
        if not self.checkpointer.save(self.step, block=True):
            raise RuntimeError(f"the final checkpoint of step {self.step} could not be written twice (events.log "
                               f"says why); the newest on disk is {self.checkpointer.newest_valid_step()}")
        self.events.productive(self.step)

    def rollback(self, reason: str) -> None:
        """Back to the newest valid checkpoint; the steps since then run again (skipping the skip_steps)."""
        self.beat("rollback")
        failed_at = self.step
        step, source = self.memory.load(), "memory"  # the copy in RAM is never older than the newest on disk
        if step is None:
            step, source = self.checkpointer.load_latest() if self.cfg.checkpoint.enabled else None, "disk"
        if step is None:
            raise RuntimeError(f"step {failed_at}: {reason}, and there is no checkpoint to roll back to")
        self.step = step
        if self.ft is not None:  # a group whose copy is older (a replacement's) heals at the next quorum
            self.ft.set_step(step)
        self.guard.reset()
        self.goodput.rollback()
        self.events.action("rollback", f"step {failed_at}: {reason}; rolled back to the checkpoint of step {step} "
                           f"(from {source})", step=failed_at, to=f"step-{step:08d}", source=source)

    def replica_group(self):
        if self.mesh is None or self.layout.dp_replicate < 2:
            return None
        return self.mesh["dp_replicate"].get_group()

    def replicas_disagree(self) -> bool:
        """Silent data corruption check: data-parallel replicas must hold identical parameters."""
        if self.ft is not None:
            bad = self.ft_mismatch()
        else:
            bad = replica_mismatch(self.parts, self.replica_group())
        if self.distributed:  # replica groups of other shards may have seen it: everyone rolls back together
            bad = [r for ranks in gather_all(bad) for r in ranks]
        if not bad:
            return False
        self.events.fault("replica_mismatch", f"step {self.step}: replica parameter fingerprints differ",
                          rank=",".join(map(str, sorted(set(bad)))))
        self.rollback(f"parameter fingerprints of data-parallel replicas differ (ranks {sorted(set(bad))})")
        return True

    def checkpoint_due(self, last_save: float) -> bool:
        """checkpoint.every steps, or "auto": the Young/Daly interval from the last save's measured cost and the
        mean time between faults (faults.mtbf_minutes, or this run's wall time per fault so far); the first save
        comes after the first step, to measure the cost. Rank 0's clock decides for everyone."""
        c = self.cfg.checkpoint
        if c.every != "auto":
            return bool(c.every and self.step % c.every == 0) or self.minutes_passed(last_save, c.every_minutes)
        cost = self.checkpointer.last_save_s
        if cost is None:
            return True
        mtbf = 60 * self.cfg.faults.mtbf_minutes or (
            (time.time() - self.goodput.record.get("first_start", time.time()))
            / max(1, self.faults_before + self.events.faults))
        due = time.monotonic() - last_save >= young_daly_interval_s(cost, max(mtbf, 1e-3))
        return self.rank0_decides(due)

    # ---- torchft replica groups (ft.py) --------------------------------------------------------------------------

    def live_state(self) -> dict:
        """What a healing group copies from this one: everything a checkpoint holds but the RNGs, and whether its
        optimizer has stepped yet (the first quorum heals a fresh run's groups to one initialisation)."""
        stepped = any(opt.state for opt in self.optimizers)
        return {"stepped": stepped, **{k: self.checkpointer.state[k].state_dict()
                                       for k in ("model", "optimizer", "progress")}}

    def load_live_state(self, state: dict) -> None:
        for k, v in state.items():
            if k != "stepped":
                self.checkpointer.state[k].load_state_dict(v)
        if not state["stepped"]:  # a state dict fills an unstepped Adam with a zero step, which its sender dropped
            for opt in self.optimizers:
                opt.state.clear()

    def ft_join(self) -> None:
        """Before the first step: join the quorum. A fresh start (or a restart of every group from disk) waits for
        every group; a replacement of a group that died heals from a live peer's memory here."""
        from .ft import ReplicaGroup
        self.beat("replica group quorum", startup=True)
        begun = time.time()
        self.ft = ReplicaGroup(self.cfg.ft, self.live_state, self.load_live_state)
        self.ft.set_step(self.step)
        ready = True
        if self.cfg.checkpoint.resume:
            joined = self.ft.wait_for_everyone(self.cfg.ft.join_timeout_s)
            self.log(f"replica group {self.rank}: {joined} of {self.cfg.ft.replicas} groups in the first quorum")
        else:
            self.ft.start_step()
            if self.ft.healed_at is None and self.ft.participants() == 1 and self.cfg.checkpoint.enabled:
                # no live peer left (they finished or died meanwhile): the disk is all there is
                self.step = self.checkpointer.load_latest() or 0
                self.ft.set_step(self.step)
                self.log(f"replica group {self.rank}: no live peer to heal from; resumed from the newest "
                         f"checkpoint (step {self.step})")
                ready = False  # the next quorum carries that step
        self.ft_ready, self.ft_failed, self.ft_last_commit = ready, None, time.time()
        self.save_wanted = False
        self.ft_previous: set[int] | None = None
        self.ft_after_quorum(begun)

    def ft_begin_step(self) -> None:
        begun = time.time()
        if not self.ft_ready:
            # a rendezvous, with start-up's budget: with two groups, a hung peer that still heartbeats holds the
            # quorum until its own watchdog ends it, and this group must outlive that wait
            self.beat(f"quorum for step {self.step + 1}", startup=True)
            self.ft.start_step()
        self.ft_ready = False
        self.ft_after_quorum(begun)

    def ft_after_quorum(self, begun: float) -> None:
        self.events.leads = self.ft.leads
        if self.ft.healed_at is not None:
            self.events.write("action", f"replica group {self.rank} copied the state of step {self.step} from a "
                              f"live peer in {self.ft.healed_at - begun:.2f}s (no checkpoint read)", everyone=True,
                              kind="heal", step=self.step, replica=self.rank, duration_s=self.ft.healed_at - begun)
            self.ft.healed_at = None
            self.guard.reset()

    def ft_committed(self, step: int) -> None:
        """A committed step: record a quorum that lost or regained groups since the last one (by whoever leads
        now, so also when the group that led is the one that died)."""
        members, previous = self.ft_members, self.ft_previous
        lost = previous - members if previous is not None else set()
        if self.ft_failed is not None or lost:
            failed = self.ft_failed or step
            self.events.fault("replica_lost" if lost else "step_failed",
                              f"step {failed}: " + (f"replica group(s) {sorted(lost)} left the quorum" if lost else
                                                    "the quorum's all-reduce or commit failed"),
                              step=failed, at=self.ft_last_commit, rank=",".join(map(str, sorted(lost))) or "?")
            if lost:
                self.events.action("shrink", f"step {step}: training goes on with replica groups "
                                   f"{sorted(members)}; no process restarted", step=step, replicas=len(members))
            else:
                self.events.action("retry", f"step {failed} ran again with replica groups {sorted(members)}; no "
                                   "process restarted", step=step, replicas=len(members))
        if previous is not None and members - previous:
            self.events.action("grow", f"step {step}: replica group(s) {sorted(members - previous)} back in the "
                               "quorum", step=step, replicas=len(members))
        self.ft_failed, self.ft_previous, self.ft_last_commit = None, members, time.time()

    def ft_mismatch(self) -> list[int]:
        """The fingerprint check across replica groups: each puts its fingerprint in its own slot of one sum."""
        n = self.cfg.ft.replicas
        slots = torch.zeros(2 * n, dtype=torch.float64)
        slots[self.rank] = 1
        slots[n + self.rank] = parameter_fingerprint(self.parts) % 2 ** 52  # exact in a float64
        self.ft.sum(slots)
        if self.ft.errored():  # a group died meanwhile: the next step's quorum sorts it out
            return []
        return off_the_majority({i: slots[n + i].item() for i in range(n) if slots[i] > 0.5})

    def describe(self) -> str:
        layout = self.layout
        return (f"{self.task.describe(self)}; {self.world_size} {self.device.type} process(es): dp_replicate="
                f"{layout.dp_replicate} dp_shard={layout.dp_shard} tp={layout.tp} pp={layout.pp}, batch "
                f"{self.cfg.training.batch_size} (micro {layout.micro_batch_size}, {layout.grad_accum} accumulation), "
                f"{self.dtype}, peak {self.peak_flops / 1e12:.3g} TFLOP/s per device -> {self.run_dir}")

    def full_state_dict(self, trained_only: bool = False) -> dict[str, Tensor]:
        """The whole unsharded model (or only what trains) on rank 0; empty elsewhere. Collective."""
        contribute = True
        if self.mesh is not None:
            contribute = all(self.mesh[d].get_local_rank() == 0 for d in ("dp_replicate", "dp_shard", "tp"))
        return full_model_state_dict(self.parts, gather_pipeline=self.pipelined, contribute=contribute,
                                     trained_only=trained_only)

    def close(self) -> None:
        if self.ft is not None:
            self.ft.shutdown()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class _Progress:
    """The non-tensor training state: step, learning-rate schedule and data position. The loaders' positions
    count global batches, so every rank holds the same state and one copy is saved."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t = self.trainer
        return {"step": t.step, "schedulers": [s.state_dict() for s in t.schedulers],
                "data": t.train_data.state_dict(), "productive_s": t.goodput.productive_s}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = state["step"]
        for sched, s in zip(t.schedulers, state["schedulers"]):
            sched.load_state_dict(s)
        try:
            t.train_data.load_state_dict(state["data"])
        except ValueError as e:
            raise CheckpointMismatch(f"{t.checkpointer.directory}: cannot continue this run's data position: {e}"
                                     ) from None

        t.goodput.productive_s = state.get("productive_s", 0.0)


def gather_all(obj) -> list:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone
