"""Pretraining: the training loop, its optimizer and schedule, validation, metrics and checkpoints.

One process or many (launched by torchrun): the parallel layout comes from the config and is applied to the model
from outside (parallelize.py, pipeline.py); the loop itself only knows whether it drives a pipeline schedule or a
plain forward/backward.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from ..args import ModelArgs
from ..model import Transformer
from .checkpoint import (CheckpointMismatch, Checkpointer, ModelState, OptimizerState, RNGState, broadcast_object,
                         full_model_state_dict, is_rank0)
from .config import ConfigError, OptimConfig, TrainConfig, resolve_layout
from .data import build_loader, data_tokenizer, dataset_dir, document_mask
from .events import EventLog, process_age_s, restart_faults
from .faults import HANG_EXIT_CODE, FaultInjector, LossGuard, replica_mismatch, start_watchdog
from .goodput import Goodput
from .network import check_multihost_settings
from .metrics import MetricsWriter, flops_per_token, measure_peak_flops, peak_memory_gib, plot_losses, synchronize
from .parallelize import build_mesh, parallelize
from .pipeline import build_pipeline


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
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)


def architecture(args: ModelArgs) -> dict:
    """What two ModelArgs must share for one's weights to mean the same in the other (all but max_seq_len)."""
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": args.vocab_size, "ffn_hidden_dim": args.ffn_hidden_dim, "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling, "tie_embeddings": args.tie_embeddings}


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


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


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.events: EventLog | None = None  # the fault record, once the run directory exists
        self.startup = {"imports": process_age_s()}  # the cold start, itemised in the start line
        self.phase, self.phase_began = None, time.monotonic()
        self.watchdog = start_watchdog(cfg.faults, cfg.run.dir, on_fire=self.record_hang)
        self.beat("rendezvous and process group creation", startup=True)
        self.device, self.distributed = init_distributed(cfg.run.device)
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.layout = layout = resolve_layout(cfg, self.world_size)
        self.mesh = build_mesh(layout, self.device.type) if self.distributed else None
        self.dtype = self.resolve_dtype()
        self.run_dir = self.make_run_dir()
        self.events = EventLog(self.run_dir, dist.get_rank() if self.distributed else 0)
        previous = self.events.take_previous_statuses() if is_rank0() else []
        if self.distributed:  # rank 0 has read the previous start's statuses before anyone overwrites them
            broadcast_object(None)
            self.events.record_termination()
        self.beat("model build", startup=True)
        self.args: ModelArgs = cfg.model_args()
        self.pipelined = layout.pp > 1

        model = self.build_model()
        if self.pipelined:
            self.n_microbatches = n_micro = cfg.parallel.pp_microbatches or layout.pp
            self.loss_divisor = 1  # set per use: micro-batches x accumulation in training, micro-batches in eval
            self.schedule, self.parts, self.has_first, self.has_last = build_pipeline(
                model, self.mesh["pp"], schedule=cfg.parallel.pp_schedule,
                stages_per_rank=cfg.parallel.pp_stages_per_rank, n_microbatches=n_micro,
                loss_fn=self.pipeline_loss, device=self.device, document_masking=cfg.data.document_masking,
                parallelize_stage=lambda part: parallelize(part, self.mesh, cfg, param_dtype=self.dtype,
                                                           pipelined=True))
        else:
            self.parts = [parallelize(model, self.mesh, cfg, param_dtype=self.dtype)]
            self.has_first = self.has_last = True
        self.loss_parallel = (not self.pipelined and layout.tp > 1 and cfg.parallel.loss_parallel)
        self.optimizers = [build_optimizer(part, cfg.optim) for part in self.parts]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, cfg.optim, cfg.training.steps)) for opt in self.optimizers]

        self.dp_rank = 0
        if self.mesh is not None:
            self.dp_rank = (self.mesh["dp_replicate"].get_local_rank() * layout.dp_shard
                            + self.mesh["dp_shard"].get_local_rank())
        data_dir = dataset_dir(cfg.data.dataset)
        self.tokenizer = data_tokenizer(data_dir, self.args.vocab_size)
        loader_args = dict(vocab_size=self.args.vocab_size, batch_size=layout.micro_batch_size,
                           seq_len=cfg.data.seq_len, rank=self.dp_rank, world_size=layout.dp, seed=cfg.run.seed,
                           val_fraction=cfg.data.val_fraction)
        self.train_data = build_loader(data_dir, split="train", **loader_args)
        self.val_data = build_loader(data_dir, split="val", **loader_args) if cfg.eval.every >= 0 else None
        self.val_start = self.val_data.state_dict() if self.val_data is not None else None

        self.step = 0
        self.rank = dist.get_rank() if self.distributed else 0
        self.injector = FaultInjector(cfg.faults.inject, self.run_dir, self.rank)
        self.guard = LossGuard(cfg.faults.spike_zscore, cfg.faults.spike_window)
        self.skip_steps = set(cfg.faults.skip_steps) | self.read_skip_steps()
        self.goodput = Goodput(self.run_dir, write=is_rank0())
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", {
            "model": ModelState(self.parts),
            "optimizer": OptimizerState(self.parts, self.optimizers),
            "progress": _Progress(self),
            "rng": RNGState(self.rank)}, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
            log=self.events.note)
        restarted = restart_faults(self.events, previous, self.world_size) if is_rank0() else []
        self.beat("checkpoint load", startup=True)
        if cfg.checkpoint.enabled and cfg.checkpoint.resume:
            self.step = self.checkpointer.load_latest() or 0
        self.record_start(restarted)

        self.flops_per_token = flops_per_token(self.args, cfg.data.seq_len)
        if cfg.metrics.peak_tflops:
            self.peak_flops = cfg.metrics.peak_tflops * 1e12
        else:
            self.peak_flops = measure_peak_flops(self.device, self.dtype)
        self.writer = MetricsWriter(self.run_dir, tensorboard=cfg.metrics.tensorboard) if is_rank0() else None

    # ---- setup ---------------------------------------------------------------------------------------------------

    def resolve_dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.training.dtype, self.device)

    def make_run_dir(self) -> Path:
        name = self.cfg.run.dir or f"runs/{self.cfg.model.preset}-{datetime.now():%Y%m%d-%H%M%S}"
        return create_run_dir(name, self.cfg.to_dict(), self.distributed)

    def build_model(self) -> Transformer:
        """The whole model with its starting weights, on every rank: identical whatever the layout, since
        parallelize() only cuts it up afterwards."""
        torch.manual_seed(self.cfg.run.seed)
        with torch.device(self.device):
            model = Transformer(self.args)
        if self.cfg.model.init_from:
            from ..weights import read_checkpoint
            ckpt = read_checkpoint(self.cfg.model.init_from)
            theirs, ours = architecture(ckpt.args), architecture(self.args)
            if theirs != ours:
                diff = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in ours if theirs[k] != ours[k])
                raise ConfigError(f"model.init_from {self.cfg.model.init_from}: not the configured model "
                                  f"({diff}); set model.preset / model.args to match")
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()},
                                                        strict=False)
            if self.args.tie_embeddings:  # the output projection is the embedding; checkpoints may omit it
                missing = [k for k in missing if k != "output.weight"]
            if missing or unexpected:
                raise ConfigError(f"model.init_from {self.cfg.model.init_from}: missing {missing}, "
                                  f"unexpected {unexpected}")
        else:
            model.init_weights(std=self.cfg.model.init_std)
        return model

    # ---- one step ------------------------------------------------------------------------------------------------

    def pipeline_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return cross_entropy(logits, targets) / self.loss_divisor

    def next_batch(self, loader) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, targets, positions) on the device. Positions restart at each document only with document
        masking; otherwise a row is one sequence, 0..T-1, whatever documents it holds."""
        inputs, targets, positions = next(loader)
        if not self.cfg.data.document_masking:
            positions = torch.arange(inputs.shape[1]).repeat(inputs.shape[0], 1)
        return inputs.to(self.device), targets.to(self.device), positions.to(self.device)

    def autocast(self):
        """Single-process bf16 runs under autocast; distributed ones get bf16 from FSDP's mixed precision."""
        if self.mesh is None and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def forward_loss(self, inputs: Tensor, targets: Tensor, positions: Tensor) -> Tensor:
        mask = document_mask(positions) if self.cfg.data.document_masking else None
        with self.autocast():
            logits = self.parts[0](inputs, positions, attn_mask=mask)
        with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
            return cross_entropy(logits, targets)

    def train_step(self, poison: bool = False) -> tuple[float, float, str | None]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss over all ranks, gradient norm,
        why the step was skipped or None). The loss guard sees the step before the optimizer applies it; a
        skipped step consumes its batch and moves the schedule on, but leaves parameters and optimizer alone.
        `poison` (fault injection) turns the gradients into NaN, as an overflow would."""
        accum = self.layout.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            inputs, targets, positions = self.next_batch(self.train_data)
            if self.pipelined:
                losses = []
                self.loss_divisor = self.n_microbatches * accum
                self.run_pipeline(self.schedule.step, inputs, targets, positions, losses)
                if self.has_last:
                    total += torch.stack(losses).sum().detach()
            else:
                if self.mesh is not None:  # reduce gradients across data-parallel ranks only after the last one
                    self.parts[0].set_requires_gradient_sync(micro == accum - 1)
                loss = self.forward_loss(inputs, targets, positions) / accum
                with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
                    loss.backward()
                total += plain(loss.detach())
        if poison:
            total = total * float("nan")
            for part in self.parts:
                for p in part.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
        grad_norm = self.clip_gradients()
        loss = self.mean_over_data_parallel(total)
        problem = self.guard.check(loss, grad_norm)
        for opt, sched in zip(self.optimizers, self.schedulers):
            if problem is None:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return loss, grad_norm, problem

    def skip_batch(self) -> None:
        """Consume one step's data and move the schedule on, without computing anything."""
        for _ in range(self.layout.grad_accum):
            next(self.train_data)
        for sched in self.schedulers:
            sched.step()

    def run_pipeline(self, fn, inputs: Tensor, targets: Tensor, positions: Tensor, losses: list) -> None:
        args = (inputs, positions) if self.has_first else ()
        fn(*args, target=targets if self.has_last else None, losses=losses if self.has_last else None)

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

    def mean_over_data_parallel(self, value: Tensor) -> float:
        """Average a per-rank loss over the data-parallel ranks. Tensor-parallel peers hold the same value and
        only last pipeline stages hold one at all, so sum everything and divide by the count of holders."""
        if not self.distributed:
            return value.item()
        value = value.clone() if self.has_last else torch.zeros_like(value)
        dist.all_reduce(value)
        return value.item() / (self.layout.dp * self.layout.tp)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over eval.steps global batches of validation data; the same batches every time."""
        self.val_data.load_state_dict(self.val_start)
        total = torch.zeros((), device=self.device)
        n_batches = self.cfg.eval.steps * self.layout.grad_accum
        for _ in range(n_batches):
            inputs, targets, positions = self.next_batch(self.val_data)
            if self.pipelined:
                losses = []
                self.loss_divisor = self.n_microbatches
                self.run_pipeline(self.schedule.eval, inputs, targets, positions, losses)
                if self.has_last:
                    total += torch.stack(losses).sum()
            else:
                total += plain(self.forward_loss(inputs, targets, positions))
        return self.mean_over_data_parallel(total / n_batches)

    # ---- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> list[float]:
        """Train to training.steps; returns the per-step losses of this call."""
        cfg = self.cfg
        losses = []
        tokens_per_step = cfg.training.batch_size * cfg.data.seq_len
        if self.writer is not None:
            self.writer.print(self.describe())
        last_save = time.monotonic()
        while self.step < cfg.training.steps:
            step = self.step + 1
            self.beat(f"step {step}", step=step)
            self.injector.before_step(step, self)
            if step in self.skip_steps:
                self.skip_batch()
                self.step = step
                self.log(f"step {step}: batch skipped (faults.skip_steps)")
                continue
            lr = self.schedulers[0].get_last_lr()[0]  # the rate this step uses
            start = time.perf_counter()
            loss, grad_norm, problem = self.train_step(poison=self.injector.due("nan", step))
            synchronize(self.device)
            elapsed = time.perf_counter() - start
            self.step = step
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
            losses.append(loss)
            if self.writer is not None and (self.step % cfg.training.log_every == 0 or self.step == 1):
                flops = self.flops_per_token * tokens_per_step / elapsed / self.world_size
                self.writer.log({
                    "step": self.step, "loss": loss, "lr": lr,
                    "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / elapsed,
                    "tokens_per_s_per_device": tokens_per_step / elapsed / self.world_size,
                    "tflops_per_device": flops / 1e12, "mfu": flops / self.peak_flops,
                    "peak_mem_gib": peak_memory_gib(self.device), "step_time_s": elapsed,
                    "tokens_seen": self.step * tokens_per_step})
            last = self.step == cfg.training.steps
            if self.val_data is not None and ((cfg.eval.every and self.step % cfg.eval.every == 0) or last):
                val = self.validate()
                if self.writer is not None:
                    self.writer.log({"step": self.step, "val_loss": val})
            save = cfg.checkpoint.enabled and not last and (
                (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0)
                or self.minutes_passed(last_save, cfg.checkpoint.every_minutes))
            every = cfg.faults.fingerprint_every
            if self.replica_group() is not None and every and (self.step % every == 0 or save):
                if self.replicas_disagree():
                    continue
            if save:
                self.beat(f"checkpoint of step {self.step}")
                self.checkpointer.save(self.step)
                last_save = time.monotonic()
        self.beat("final checkpoint and export")
        if cfg.checkpoint.enabled:
            self.checkpointer.save(self.step, block=True)
        if cfg.checkpoint.export:
            self.export(self.run_dir / "model")
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
        return losses

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
        events.set_status("hang", what=what)
        events.fault("hang", message, everyone=True, at=time.time() - waited_s, phase=what)
        events.write("action", f"rank {events.rank} exits with code {HANG_EXIT_CODE} for the launcher to restart "
                     "the job", everyone=True, kind="exit", code=HANG_EXIT_CODE)

    def record_start(self, restarted: list[dict]) -> None:
        """The start line: which attempt, on which hosts, resumed from which checkpoint (or fresh)."""
        hosts = gather_all(self.events.host) if self.distributed else [self.events.host]
        resumed = f"step-{self.step:08d}" if self.step else "fresh"
        attempt = self.goodput.record.get("starts", 1) - 1
        if restarted:
            self.events.action("restart", f"the job restarted (attempt {attempt}) and resumes from {resumed}",
                               attempt=attempt, resumed=resumed)
        self.beat("first step")  # ends the last start-up phase
        phases = {k: round(v, 2) for k, v in self.startup.items()}
        self.events.write("start", f"start {attempt}: {self.world_size} process(es) on "
                          f"{len(set(hosts))} host(s), resuming from {resumed}; start-up "
                          + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()), attempt=attempt,
                          world=self.world_size, hosts=",".join(sorted(set(hosts))), resumed=resumed,
                          launcher_restart=os.environ.get("TORCHELASTIC_RESTART_COUNT"),
                          **{f"{k}_s": v for k, v in phases.items()})

    def minutes_passed(self, since: float, minutes: float) -> bool:
        """Whether a time-based checkpoint is due; rank 0's clock decides for everyone."""
        if minutes <= 0:
            return False
        due = time.monotonic() - since >= 60 * minutes
        return bool(broadcast_object(due)) if self.distributed else due

    def read_skip_steps(self) -> set[int]:
        path = self.run_dir / "skip_steps.json"
        return set(json.loads(path.read_text())) if path.exists() else set()

    def add_skip_steps(self, steps) -> None:
        """Steps whose batch is skipped from now on, also after a restart or rollback replays them."""
        self.skip_steps.update(steps)
        if is_rank0():
            tmp = self.run_dir / "skip_steps.json.tmp"
            tmp.write_text(json.dumps(sorted(self.skip_steps)))
            tmp.replace(self.run_dir / "skip_steps.json")

    def rollback(self, reason: str) -> None:
        """Back to the newest valid checkpoint; the steps since then run again (skipping the skip_steps)."""
        self.beat("rollback")
        failed_at = self.step
        step = self.checkpointer.load_latest() if self.cfg.checkpoint.enabled else None
        if step is None:
            raise RuntimeError(f"step {failed_at}: {reason}, and there is no checkpoint to roll back to")
        self.step = step
        self.guard.reset()
        self.goodput.rollback()
        self.events.action("rollback", f"step {failed_at}: {reason}; rolled back to the checkpoint of step {step}",
                           step=failed_at, to=f"step-{step:08d}")

    def replica_group(self):
        if self.mesh is None or self.layout.dp_replicate < 2:
            return None
        return self.mesh["dp_replicate"].get_group()

    def replicas_disagree(self) -> bool:
        """Silent data corruption check: data-parallel replicas must hold identical parameters."""
        bad = replica_mismatch(self.parts, self.replica_group())
        if self.distributed:  # replica groups of other shards may have seen it: everyone rolls back together
            bad = [r for ranks in gather_all(bad) for r in ranks]
        if not bad:
            return False
        self.events.fault("replica_mismatch", f"step {self.step}: replica parameter fingerprints differ",
                          rank=",".join(map(str, sorted(set(bad)))))
        self.rollback(f"parameter fingerprints of data-parallel replicas differ (ranks {sorted(set(bad))})")
        return True

    def describe(self) -> str:
        layout, args, cfg = self.layout, self.args, self.cfg
        return (f"training {cfg.model.preset} ({args.num_params() / 1e6:.1f}M parameters) on {self.world_size} "
                f"{self.device.type} process(es): dp_replicate={layout.dp_replicate} dp_shard={layout.dp_shard} "
                f"tp={layout.tp} pp={layout.pp}, {cfg.training.batch_size} x {cfg.data.seq_len} tokens per step "
                f"(micro batch {layout.micro_batch_size}, {layout.grad_accum} accumulation), {self.dtype}, "
                f"peak {self.peak_flops / 1e12:.3g} TFLOP/s per device -> {self.run_dir}")

    def export(self, path: Path) -> None:
        """Write the trained model where `llama3.load` and `llama3 chat` read it (Hugging Face layout)."""
        contribute = True
        if self.mesh is not None:
            contribute = self.mesh["dp_replicate"].get_local_rank() == 0 and self.mesh["dp_shard"].get_local_rank() \
                == 0 and self.mesh["tp"].get_local_rank() == 0
        state = full_model_state_dict(self.parts, gather_pipeline=self.pipelined, contribute=contribute)
        if not is_rank0():
            return
        from ..export import save_checkpoint
        save_checkpoint(path, self.args, state, layout=self.cfg.checkpoint.export_layout, tokenizer=self.tokenizer)
        self.writer.print(f"model: {path}")

    def close(self) -> None:
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
