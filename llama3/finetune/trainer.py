"""The fine-tuning loop: supervised fine-tuning (SFT) with prompt masking, or DPO on preference pairs; every weight
(full), low-rank adapters (LoRA) or adapters over a 4-bit base (QLoRA).

It runs in one process or many under torchrun, with the training stack's pieces: data-parallel sharding
(FSDP / DDP / HSDP from `llama3.train.parallelize`), activation checkpointing and compile, the optimizer and
schedule, DCP checkpoints (only the trained tensors), and the metrics writer.

    llama3 finetune --data chats.jsonl --method qlora training.steps=200
    torchrun --nproc-per-node 2 -m llama3.finetune --data chats.jsonl --method full
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from ..llama import Llama, load
from ..train.checkpoint import Checkpointer, OptimizerState, full_model_state_dict, is_rank0
from ..train.config import split_batch
from ..train.data import document_mask
from ..train.metrics import MetricsWriter, flops_per_token, matmul_params, measure_peak_flops, plot_losses, synchronize
from ..train.parallelize import build_mesh, parallelize
from ..train.trainer import (build_optimizer, create_run_dir, init_distributed, lr_multiplier, plain,
                             resolve_dtype)
from .config import FinetuneConfig
from .data import IGNORE, Batches, as_row, collate, fixed_batches, load_preferences, load_sft, pack, split_validation
from .dpo import dpo_loss, sequence_logps
from .lora import adapters_disabled, add_lora, apply_adapter, save_adapter
from .samples import SAMPLES

ADAPTER_KEY = re.compile(r"\.lora_[ab]$")


# ---- memory ---------------------------------------------------------------------------------------------------------

def reset_peak_memory(device: torch.device) -> None:
    """Start measuring peak memory from now: setup (e.g. loading full-precision weights to quantize) not counted."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        # glibc keeps freed heap memory (the weights replaced by 4-bit codes) resident until asked to return it.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak resident set from the current one


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory since the reset, or on CPU the peak resident memory of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        if m := re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()):
            return int(m.group(1)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tensor_gib(model: nn.Module) -> float:
    """Memory held by the model's parameters and buffers (4-bit codes count as what they are)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # a tied weight counts once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30


# ---- checkpoint state -----------------------------------------------------------------------------------------------

class TrainedState(Stateful):
    """The tensors being trained: every parameter (full) or only the adapters. Checkpoints of a LoRA run hold
    megabytes, not the base model."""

    def __init__(self, model: nn.Module, adapters_only: bool):
        self.model, self.adapters_only = model, adapters_only
        self.options = StateDictOptions(ignore_frozen_params=True)

    def state_dict(self) -> dict:
        state = get_model_state_dict(self.model, options=self.options)
        return {k: v for k, v in state.items() if not self.adapters_only or ADAPTER_KEY.search(k)}

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=False))


class _Progress(Stateful):
    def __init__(self, tuner: Finetuner):
        self.tuner = tuner

    def state_dict(self) -> dict:
        t = self.tuner
        return {"step": t.step, "scheduler": t.scheduler.state_dict(), "data": t.train.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        t = self.tuner
        t.step = state["step"]
        t.scheduler.load_state_dict(state["scheduler"])
        t.train.load_state_dict(state["data"])


# ---- the loop -------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    run_dir: Path
    llm: Llama  # the fine-tuned model in memory (rank 0 of a single process; adapters not merged)
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    peak_mem_gib: float = 0.0  # during training: model, activations, gradients, optimizer
    model_gib: float = 0.0  # the model's own tensors
    tokens_per_s: float = 0.0  # over the steps after the first (which pays for warm-up)
    output: Path | None = None  # the adapter directory, or the model directory of a full fine-tune

    def summary(self) -> dict:
        return {"losses": self.losses, "val_losses": self.val_losses, "peak_mem_gib": self.peak_mem_gib,
                "model_gib": self.model_gib, "tokens_per_s": self.tokens_per_s,
                "output": str(self.output) if self.output else None}


class Finetuner:
    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.device, self.distributed = init_distributed(cfg.run.device)
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.layout = split_batch(cfg.parallel, cfg.training, self.world_size)  # tp = pp = 1 (config)
        self.mesh = build_mesh(self.layout, self.device.type) if self.distributed else None
        self.dp_rank = dist.get_rank() if self.distributed else 0  # tp = pp = 1: every rank is a data rank
        self.dtype = self.resolve_dtype()
        self.run_dir = self.make_run_dir()

        self.llm = self.load_model()
        self.model = self.llm.model
        self.tokenizer, self.chat_format = self.llm.tokenizer, self.llm.chat_format
        self.train, self.val_rows, self.data_summary = self.load_data()

        parallelize(self.model, self.mesh, cfg, param_dtype=self.dtype)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        # Adapters are all matrices, which leaves the no-decay group empty; DCP cannot restore an empty group.
        self.optimizer.param_groups = [g for g in self.optimizer.param_groups if g["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.optim, cfg.training.steps))
        self.step = 0
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", {
            "model": TrainedState(self.model, adapters_only=cfg.method != "full"),
            "optimizer": OptimizerState([self.model], [self.optimizer]),
            "progress": _Progress(self)}, keep=cfg.checkpoint.keep)
        if cfg.checkpoint.enabled and cfg.checkpoint.resume:
            self.step = self.checkpointer.load_latest() or 0
        self.writer = MetricsWriter(self.run_dir, tensorboard=cfg.metrics.tensorboard) if is_rank0() else None

    # ---- setup ------------------------------------------------------------------------------------------------------

    def resolve_dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.training.dtype, self.device)

    def make_run_dir(self) -> Path:
        kind = "dpo" if self.cfg.dpo.enabled else "sft"
        name = self.cfg.run.dir or f"runs/finetune-{kind}-{self.cfg.method}-{datetime.now():%Y%m%d-%H%M%S}"
        return create_run_dir(name, self.cfg.to_dict(), self.distributed)

    def load_model(self) -> Llama:
        """The base on the CPU, then adapters (LoRA), or 4-bit layers quantized one by one on the device (QLoRA),
        then the model on the device. Full fine-tuning keeps fp32 master weights; adapters train over a base
        stored in the compute dtype."""
        cfg = self.cfg
        storage = torch.float32 if cfg.method == "full" else self.dtype
        llm = load(cfg.model, dtype=storage)
        model = llm.model
        if cfg.method == "full":
            model.requires_grad_(True)
        else:
            torch.manual_seed(cfg.run.seed)  # the adapters' random init: the same on every rank and every run
            quant = cfg.quant.kind if cfg.method == "qlora" else None
            add_lora(model, cfg.lora, quant=quant, block_size=cfg.quant.block_size, device=self.device)
        if cfg.method != "lora":
            # Loaded weights may be views of the memory-mapped checkpoint (read-only for GGUF). Full fine-tuning
            # writes to them; QLoRA has read every page to quantize and would keep them all resident. Owning
            # copies (for QLoRA only the embeddings and norms are left) let the file go.
            for p in model.parameters():
                p.data = p.data.clone()
        model.to(self.device)
        model.train()
        return llm

    def load_data(self):
        """(train batches, validation rows, summary). SFT rows are examples (packed or not); DPO rows are pairs."""
        d, seed = self.cfg.data, self.cfg.run.seed
        path = SAMPLES.get(d.path, d.path)
        log = sys.stderr if is_rank0() else None
        loader = load_preferences if self.cfg.dpo.enabled else load_sft
        kwargs = {"max_len": d.seq_len + 1, "on_error": d.on_error, "log": log}
        if not self.cfg.dpo.enabled:
            kwargs["strategy"] = d.labels
        items, report = loader(path, self.chat_format, **kwargs)
        summary = [report.summary()]
        if d.val_path:
            val, val_report = loader(SAMPLES.get(d.val_path, d.val_path), self.chat_format, **kwargs)
            train = items
            summary.append(val_report.summary())
        else:
            train, val = split_validation(items, d.val_fraction, seed)
        if not self.cfg.dpo.enabled:
            train = pack(train, d.seq_len + 1) if d.packing else [as_row(e) for e in train]
            val = [as_row(e) for e in val]
        batches = Batches(train, self.layout.micro_batch_size, rank=self.dp_rank, world_size=self.layout.dp,
                          seed=seed)
        summary.append(f"{len(train)} training rows, {len(val)} validation")
        return batches, val, "; ".join(summary)

    # ---- one step ---------------------------------------------------------------------------------------------------

    def autocast(self):
        if self.mesh is None and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def logits(self, inputs: Tensor, positions: Tensor | None) -> Tensor:
        mask = document_mask(positions) if positions is not None else None
        with self.autocast():
            return self.model(inputs, positions, attn_mask=mask)

    def sft_loss(self, rows) -> tuple[Tensor, int, dict]:
        """Summed cross-entropy over the learned tokens, their count, and no extra statistics."""
        length = self.cfg.data.seq_len + 1 if self.cfg.data.packing else None
        inputs, targets, positions = (t.to(self.device) for t in collate(rows, self.tokenizer.pad_id, length))
        logits = self.logits(inputs, positions if self.cfg.data.packing else None)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, int((targets != IGNORE).sum()), {}

    def dpo_loss(self, pairs) -> tuple[Tensor, int, dict]:
        """Summed DPO loss over the pairs, their count, and the summed rewards statistics. Chosen and rejected go
        through the model as one batch; the reference is the same model with its adapters off."""
        rows = [as_row(p.chosen) for p in pairs] + [as_row(p.rejected) for p in pairs]
        inputs, targets, _ = (t.to(self.device) for t in collate(rows, self.tokenizer.pad_id))
        policy = sequence_logps(self.logits(inputs, None), targets)
        with torch.no_grad(), adapters_disabled(self.model):
            reference = sequence_logps(self.logits(inputs, None), targets)
        loss, stats = dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=self.cfg.dpo.beta)
        return loss * len(pairs), len(pairs), {k: v.sum() for k, v in stats.items()}

    def loss_of(self, rows) -> tuple[Tensor, int, dict]:
        return self.dpo_loss(rows) if self.cfg.dpo.enabled else self.sft_loss(rows)

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def count(self, rows) -> int:
        """What the loss averages over: learned tokens (SFT) or pairs (DPO)."""
        if self.cfg.dpo.enabled:
            return len(rows)
        return sum(sum(label != IGNORE for label in r.labels[1:]) for r in rows)

    def tokens_in(self, rows) -> int:
        """Tokens the model reads (for tokens per second)."""
        if self.cfg.dpo.enabled:
            return sum(len(p.chosen.tokens) + len(p.rejected.tokens) - 2 for p in rows)
        return sum(len(r.tokens) - 1 for r in rows)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches per rank. The loss is a mean over every learned token
        (pair, for DPO) of the global batch, however they fall into micro-batches and ranks."""
        accum = self.layout.grad_accum
        micro_batches = [next(self.train) for _ in range(accum)]
        (total,) = self.all_sum([sum(self.count(rows) for rows in micro_batches)])
        loss_sum, tokens, stats = torch.zeros((), device=self.device), 0, {}
        for i, rows in enumerate(micro_batches):
            if self.mesh is not None:
                self.model.set_requires_gradient_sync(i == accum - 1)
            loss, _, extra = self.loss_of(rows)
            # Data-parallel gradients are averaged over ranks: scale so the result is the global mean.
            (loss * self.layout.dp / max(total, 1)).backward()
            loss_sum += plain(loss.detach())
            tokens += self.tokens_in(rows)
            for k, v in extra.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        grad_norm = self.clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(stats)
        sums = self.all_sum([float(loss_sum), tokens, *(stats[k] for k in keys)])
        record = {"loss": sums[0] / max(total, 1), "lr": lr, "grad_norm": grad_norm, "tokens": sums[1]}
        record.update({k: v / max(total, 1) for k, v in zip(keys, sums[2:])})
        return record

    def clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = plain(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, norm, foreach=True)
        return norm.item()

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean loss (and DPO statistics) over the validation rows, at most eval.steps batches."""
        was_training = self.model.training
        self.model.eval()
        loss_sum, total, stats = 0.0, 0, {}
        # Batches of the global batch size, whatever the micro batch, so every layout scores the same rows.
        per_rank = self.layout.micro_batch_size * self.layout.grad_accum
        batches = fixed_batches(self.val_rows, per_rank, rank=self.dp_rank, world_size=self.layout.dp)
        for _, (rows, real) in zip(range(self.cfg.eval.steps), batches):
            loss, n, extra = self.loss_of(rows)
            if not real:  # this rank ran out of rows and only keeps in step with the others
                continue
            loss_sum, total = loss_sum + float(plain(loss)), total + n
            for k, v in extra.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        keys = sorted(stats)
        sums = self.all_sum([loss_sum, total, *(stats[k] for k in keys)])
        self.model.train(was_training)
        out = {"val_loss": sums[0] / max(sums[1], 1)}
        out.update({f"val_{k}": v / max(sums[1], 1) for k, v in zip(keys, sums[2:])})
        return out

    # ---- the loop ---------------------------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token. Frozen weights need no weight gradients: a LoRA step is forward (2 per
        parameter) and input gradients (2), not 6. DPO adds the reference model's forward."""
        args = self.llm.args
        flops = flops_per_token(args, seq_len)
        if self.cfg.method != "full":
            flops -= 2 * matmul_params(args)
        if self.cfg.dpo.enabled:
            flops += 2 * matmul_params(args) + 4 * args.n_layers * args.dim * seq_len / 2
        return flops

    def fit(self) -> FinetuneResult:
        cfg = self.cfg
        result = FinetuneResult(self.run_dir, self.llm)
        peak_flops = (cfg.metrics.peak_tflops * 1e12 if cfg.metrics.peak_tflops
                      else measure_peak_flops(self.device, self.dtype))
        if self.writer is not None:
            self.writer.print(self.describe())
        if self.val_rows and cfg.eval.every >= 0 and self.step == 0:
            self.log_val(result, self.validate())
        reset_peak_memory(self.device)
        timed_tokens, timed_seconds = 0.0, 0.0
        while self.step < cfg.training.steps:
            start = time.perf_counter()
            record = self.train_step()
            synchronize(self.device)
            elapsed = time.perf_counter() - start
            self.step += 1
            result.losses.append(record["loss"])
            tokens = record.pop("tokens")
            if len(result.losses) > 1:
                timed_tokens, timed_seconds = timed_tokens + tokens, timed_seconds + elapsed
            seq_len = tokens / (cfg.training.batch_size * (2 if cfg.dpo.enabled else 1))
            flops = self.flops_per_token(int(seq_len)) * tokens / elapsed / self.world_size
            result.peak_mem_gib = peak_memory_gib(self.device)
            if self.writer is not None and (self.step % cfg.training.log_every == 0 or self.step == 1):
                self.writer.log({
                    "step": self.step, **record,
                    "tokens_per_s": tokens / elapsed, "tokens_per_s_per_device": tokens / elapsed / self.world_size,
                    "tflops_per_device": flops / 1e12, "mfu": flops / peak_flops,
                    "peak_mem_gib": result.peak_mem_gib, "step_time_s": elapsed})
                if cfg.dpo.enabled:
                    self.writer.print(f"{'':13}reward margin {record['margin']:+.3f} | accuracy "
                                      f"{record['accuracy']:.2f}")
            last = self.step == cfg.training.steps
            if self.val_rows and cfg.eval.every >= 0 and ((cfg.eval.every and self.step % cfg.eval.every == 0)
                                                          or last):
                self.log_val(result, self.validate())
            if cfg.checkpoint.enabled and cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not last:
                self.checkpointer.save(self.step)
        if cfg.checkpoint.enabled:
            self.checkpointer.save(self.step)
        self.model.eval()
        result.tokens_per_s = timed_tokens / timed_seconds if timed_seconds else 0.0
        result.model_gib = tensor_gib(self.model)
        if cfg.checkpoint.export:
            result.output = self.export()
        if self.writer is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
            self.writer.print(f"peak memory {result.peak_mem_gib:.2f} GiB (model tensors {result.model_gib:.2f} GiB)"
                              + (f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""))
            if cfg.metrics.plot and plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png"):
                self.writer.print(f"loss curve: {self.run_dir / 'loss.png'}")
            self.writer.close()
        return result

    def log_val(self, result: FinetuneResult, val: dict) -> None:
        result.val_losses.append((self.step, val["val_loss"]))
        if self.writer is not None:
            self.writer.log({"step": self.step, **val})
            if "val_margin" in val:
                self.writer.print(f"{'':13}val reward margin {val['val_margin']:+.3f} | accuracy "
                                  f"{val['val_accuracy']:.2f}")

    def describe(self) -> str:
        cfg, l = self.cfg, self.layout
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        what = "DPO" if cfg.dpo.enabled else "SFT"
        quant = f" ({cfg.quant.kind} base)" if cfg.method == "qlora" else ""
        return (f"{what} {cfg.method}{quant} of {cfg.model}: {trained / 1e6:.2f}M trained parameters, model tensors "
                f"{tensor_gib(self.model):.2f} GiB; {self.data_summary}; {self.world_size} {self.device.type} "
                f"process(es), batch {cfg.training.batch_size} (micro {l.micro_batch_size}, {l.grad_accum} "
                f"accumulation), {self.dtype} -> {self.run_dir}")

    def export(self) -> Path | None:
        """Adapters to <run>/adapter (and a merged model if asked); a full fine-tune to <run>/model, in the
        Hugging Face layout that `llama3.load` and `llama3 chat` read."""
        from ..export import save_checkpoint
        cfg = self.cfg
        template = getattr(self.tokenizer, "chat_template", None)
        if cfg.method == "full":
            state = full_model_state_dict([self.model], gather_pipeline=False)
            if not is_rank0():
                return None
            path = self.run_dir / "model"
            save_checkpoint(path, self.llm.args, state, layout="hf", tokenizer=self.tokenizer,
                            chat_template=template)
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            state = {k: v for k, v in get_model_state_dict(self.model, options=options).items()
                     if ADAPTER_KEY.search(k)}
            if not is_rank0():
                return None
            path = save_adapter(self.run_dir / "adapter", state, cfg.lora, base_model=cfg.model,
                                model_args=self.llm.args)
            if cfg.export.merged != "none":
                merged = merge_adapter(cfg.model, path, self.run_dir / "merged", to=cfg.export.merged)
                self.writer.print(f"merged model: {merged}")
        self.writer.print(f"{'adapter' if cfg.method != 'full' else 'model'}: {path}")
        return path

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def merge_adapter(base: str, adapter: str | Path, dst: str | Path, *, to: str = "hf", shards: int = 1,
                  dtype: str | torch.dtype | None = None) -> Path:
    """Load the base at full precision, fold the adapter into its weights and write it in the Hugging Face or
    Meta layout, tokenizer and chat template included. A QLoRA adapter merges into the unquantized base."""
    from ..export import save_checkpoint
    llm = apply_adapter(load(base, dtype=dtype), adapter)
    save_checkpoint(Path(dst), llm.args, llm.model.state_dict(), layout=to, tokenizer=llm.tokenizer,
                    chat_template=getattr(llm.tokenizer, "chat_template", None), shards=shards)
    return Path(dst)


def run(cfg: FinetuneConfig) -> FinetuneResult:
    tuner = Finetuner(cfg)
    try:
        return tuner.fit()
    finally:
        tuner.close()
