"""Training throughput on CPU: our trainer against Hugging Face transformers' LlamaForCausalLM, same run.

The SmolLM2-135M shape (30 layers, dim 576, GQA 9/3 heads, vocabulary 49152, tied embeddings), fp32. Every
contestant does the same full optimizer step on the same synthetic batch: forward, cross-entropy, backward,
gradient clipping, fused AdamW. Steps of the contestants are interleaved (round robin) so that a noisy machine
slows them alike; the table gives the best and the median step of each, and the CPU time of a step (less
sensitive to other processes on a shared machine than the wall clock).

    python benchmarks/bench_train.py                        # batch 2 x 1024 tokens, 4 rounds
    python benchmarks/bench_train.py --batch 4 --seq-len 512 --rounds 6 --no-compile
    python benchmarks/bench_train.py --batch 1 --seq-len 512 --rounds 3 --no-compile --both-linears  # oneDNN vs MKL

MFU is against the best fp32 matmul rate measured between the steps over a few shapes, in MKL and in oneDNN
(the practical peak of this CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from llama3.args import ModelArgs
from llama3.fast import onednn_linear
from llama3.train.config import load_config
from llama3.train.metrics import flops_per_token
from llama3.train.pretrain import Pretraining
from llama3.train.trainer import Trainer

PRESET = "smollm2-135m"


MATMUL_SHAPES = [(2048, 2048, 2048), (4096, 4096, 4096), (2048, 576, 1536), (2048, 1536, 576)]


def matmul_probe():
    """One fp32 matmul of each shape in each of torch's CPU matmul libraries (MKL through torch.mm, oneDNN);
    returns the best FLOP/s among them (the practical peak of this CPU)."""
    operands = [(torch.randn(m, k), torch.randn(n, k)) for m, k, n in MATMUL_SHAPES]  # b as (n, k): a @ b.T
    matmuls = [lambda a, b: torch.mm(a, b.t()), onednn_linear]

    def probe() -> float:
        best = 0.0
        for a, b in operands:
            for matmul in matmuls:
                start = time.perf_counter()
                matmul(a, b)
                best = max(best, 2 * a.shape[0] * a.shape[1] * b.shape[0] / (time.perf_counter() - start))
        return best

    return probe


def our_step(batch: int, seq_len: int, compile: bool, onednn_linears: bool | None = None):
    """One optimizer step of our trainer (synthetic data, no logging or checkpoints)."""
    overrides = [] if onednn_linears is None else [f"training.onednn_linears={str(onednn_linears).lower()}"]
    overrides += [f"model.preset={PRESET}", "data.dataset=synthetic", f"data.seq_len={seq_len}",
                 f"training.batch_size={batch}", f"training.compile={str(compile).lower()}",
                 "training.dtype=float32", "eval.every=-1", "checkpoint.enabled=false", "checkpoint.export=false",
                 "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false",
                 f"run.dir={tempfile.mkdtemp(prefix='bench_train-')}"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, Pretraining(cfg))
    return lambda: trainer.train_step()


def hf_step(batch: int, seq_len: int):
    """The same step written the usual way for transformers' LlamaForCausalLM (eager, SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from llama3.train.data import SyntheticTokens
    a = ModelArgs.preset(PRESET)
    config = LlamaConfig(hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
                         num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                         tie_word_embeddings=a.tie_embeddings, rope_theta=a.rope_theta, rms_norm_eps=a.norm_eps,
                         max_position_embeddings=a.max_seq_len, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    data = SyntheticTokens(a.vocab_size, batch, seq_len)

    def step():
        inputs, targets, _ = next(data)
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per contestant")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our trainer with training.compile=true")
    parser.add_argument("--both-linears", action="store_true",
                        help="time our trainer with oneDNN linears and with plain (MKL) ones, whatever this CPU's default")
    args = parser.parse_args()

    probe = matmul_probe()
    probe()
    peaks = []
    contestants = {"hf transformers": hf_step(args.batch, args.seq_len),
                   "ours": our_step(args.batch, args.seq_len, compile=False)}
    if args.both_linears:
        contestants = {"hf transformers": contestants["hf transformers"],
                       "ours, oneDNN linears": our_step(args.batch, args.seq_len, False, onednn_linears=True),
                       "ours, MKL linears": our_step(args.batch, args.seq_len, False, onednn_linears=False)}
    if args.compile:
        contestants["ours, compiled"] = our_step(args.batch, args.seq_len, compile=True)
    for fn in contestants.values():  # warm-up: allocator, kernel choice, compilation
        fn()
    times = {name: [] for name in contestants}
    cpu_times = {name: [] for name in contestants}
    for _ in range(args.rounds):  # the peak is probed between steps too: the machine's state then, not at start
        for name, fn in contestants.items():
            peaks.append(probe())
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    peak = max(peaks)

    tokens = args.batch * args.seq_len
    flops = flops_per_token(ModelArgs.preset(PRESET), args.seq_len) * tokens
    print(f"\ncpu capability {torch.backends.cpu.get_cpu_capability()}; {PRESET} shape, fp32, "
          f"{torch.get_num_threads()} threads, {args.batch} x {args.seq_len} tokens per step; "
          f"fp32 matmul peak measured {peak / 1e9:.0f} GFLOP/s\n")
    print("| trainer | best tokens/s | median tokens/s | GFLOP/s (best) | MFU (best) | CPU-seconds per step (median) |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        best, median = min(ts), statistics.median(ts)
        print(f"| {name} | {tokens / best:,.0f} | {tokens / median:,.0f} | {flops / best / 1e9:.0f} | "
              f"{100 * flops / best / peak:.0f}% | {statistics.median(cpu_times[name]):.1f} |")
    print()
    hf = "hf transformers"
    for name in contestants:
        if name != hf:
            print(f"{name} / {hf}: {min(times[hf]) / min(times[name]):.2f}x (best step), "
                  f"{statistics.median(times[hf]) / statistics.median(times[name]):.2f}x (median step), "
                  f"{statistics.median(cpu_times[hf]) / statistics.median(cpu_times[name]):.2f}x (CPU time)")


if __name__ == "__main__":
    main()
