"""Training metrics: FLOP counting, MFU against a configured or measured peak, memory, and the writers (console,
JSONL, TensorBoard, a loss-curve PNG)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..args import ModelArgs
from ..fast import onednn_linear


def matmul_params(args: ModelArgs) -> int:
    """Parameters that take part in a matmul for every token: all but the embedding table (a lookup) and the norm
    gains. The output projection counts even when it shares its weight with the embedding."""
    lookup = 0 if args.tie_embeddings else args.vocab_size * args.dim
    norms = (2 * args.n_layers + 1) * args.dim
    return args.num_params() - lookup - norms


def flops_per_token(args: ModelArgs, seq_len: float, trained_params: int | None = None) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward 2, backward 4), plus attention's two T x T
    matmuls (QK^T and AV: 4 * T * dim forward per layer, x3 with backward), halved because causal attention skips
    the upper triangle. Document masking skips more, but is not credited.

    `trained_params` (adapters): the base is frozen, so its weights get no gradient matmul: forward 2 and input
    gradient 2 per weight. The first block's q/k/v projections need no input gradient either, since nothing
    before them trains. The adapters themselves cost 6 per parameter."""
    attention = 12 * args.n_layers * args.dim * seq_len / 2
    if trained_params is None:
        return 6 * matmul_params(args) + attention
    first_qkv = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    return 4 * matmul_params(args) - 2 * first_qkv + 6 * trained_params + attention


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                       seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul in the training dtype: the practical peak of this device. On CPU in fp32
    the faster of torch's default matmul (MKL) and oneDNN's, which the trainer uses (llama3/fast.py)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmuls = [torch.mm]
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        matmuls.append(onednn_linear)  # a @ b.T: the same FLOPs
    best = 0.0
    for matmul in matmuls:
        matmul(a, b)  # warm-up (kernel selection, page faults)
        synchronize(device)
        runs, start = 0, time.perf_counter()
        while True:
            matmul(a, b)
            runs += 1
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / len(matmuls) and runs >= 2:
                break
        best = max(best, 2 * size**3 * runs / elapsed)
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def tensor_gib(model: nn.Module) -> float:
    """Memory held by the model's parameters and buffers (4-bit codes count as what they are)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # a tied weight counts once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30


class MetricsWriter:
    """Writes each record to the console, metrics.jsonl and TensorBoard (when installed); plots the losses at the
    end. Only one process (rank 0) should own a writer."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, stream=None):
        self.run_dir = run_dir
        self.stream = stream or sys.stdout
        path = run_dir / "metrics.jsonl"
        # the furthest training step recorded so far, over every start: steps up to it that come again (after a
        # restart or a rollback) are marked replayed
        self.furthest = max((r["step"] for r in read_jsonl(path) if "loss" in r), default=0)
        self.jsonl = open(path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional: metrics.jsonl has everything
                pass

    def log(self, record: dict) -> None:
        """Write one record, stamped with the wall-clock time (seconds since the epoch)."""
        record = {**record, "time": round(time.time(), 3)}
        if "loss" in record:
            if record["step"] <= self.furthest:
                record["replayed"] = True
            self.furthest = max(self.furthest, record["step"])
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        print(format_record(record), file=self.stream, flush=True)

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (empty if there is none); a line cut short by a crash is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def format_record(r: dict) -> str:
    """One console line; an objective's own statistics (DPO's reward margin and accuracy) follow the loss."""
    if "val_loss" in r:
        return " | ".join([f"step {r['step']:>6}", *(f"{k.replace('_', ' ')} {v:.4f}" for k, v in r.items()
                                                      if k not in ("step", "time", "replayed"))])
    extra = [f"{k} {v:.3f}" for k, v in r.items() if k in ("chosen_reward", "rejected_reward", "margin", "accuracy")]
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}", *extra, f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}",
             f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_device']:,.0f}/dev)",
             f"{r['tflops_per_device']:.3g} TFLOP/s/dev", f"MFU {100 * r['mfu']:.1f}%",
             f"mem {r['peak_mem_gib']:.2f} GiB", f"{r['step_time_s']:.2f}s"]
    return " | ".join(parts) + (" (replayed)" if r.get("replayed") else "")


def plot_losses(jsonl_path: Path, png_path: Path) -> bool:
    """Training (and validation) loss against step, from metrics.jsonl. False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, val = [], []
    for r in read_jsonl(jsonl_path):
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True
