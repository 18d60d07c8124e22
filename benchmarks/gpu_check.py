"""GPU check: bf16 decode against the memory-bandwidth roof and prefill against the bf16 matmul rate, for random
models shaped like Llama 3.2 1B and Llama 3 8B (no download: the weights are random, the work is the same).

    python benchmarks/gpu_check.py                                  # CUDA, both shapes, < 5 minutes on one H200
    python benchmarks/gpu_check.py --device cpu --presets debug     # smoke test of the script itself

For each shape it measures, with the same code the CPU uses (llama3.model, llama3.generate.DecodeStep):
  decode   tokens/s of batch-1 greedy decoding, eager and compiled with CUDA graphs (--modes can add plain
           compiled); the roof is the measured copy bandwidth over the bytes read per token (weights + KV cache);
  prefill  tokens/s over one prompt and the matmul FLOP/s it reaches against a large bf16 matmul's rate.
Every phase is guarded: a failure prints its reason and the check goes on.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llama3.args import ModelArgs  # noqa: E402
from llama3.generate import DecodeStep  # noqa: E402
from llama3.model import KVCache, Transformer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    """Best wall time of `repeat` calls, after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes moved per second by a large device copy (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, repeat=5)


def matmul_rate(device: torch.device, n: int) -> float:
    """bf16 FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeat=5)


@torch.no_grad()
def random_model(args: ModelArgs, device: torch.device) -> Transformer:
    """Random bf16 weights made on the device itself (an 8B model never exists on the host)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def weight_bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights appear once


@torch.inference_mode()
def decode_rate(model: Transformer, step: DecodeStep, prompt: int, new_tokens: int, device: torch.device) -> float:
    """Tokens per second of batch-1 greedy decoding after a prompt (prefill not timed)."""
    cache = KVCache(model.args, 1, prompt + new_tokens, dtype=torch.bfloat16, device=device)
    tokens = torch.randint(0, model.args.vocab_size, (1, prompt), device=device)
    logits = model(tokens, cache=cache, logits_index=torch.tensor([prompt - 1], device=device))[:, -1]

    def run(n: int, start: int, first: torch.Tensor) -> torch.Tensor:
        token = first
        for i in range(n):
            position = torch.full((1, 1), start + i, device=device)
            token = step(token, position, cache, kv_len=start + i + 1)[:, -1].argmax(-1, keepdim=True)
        return token

    first = logits.argmax(-1, keepdim=True)
    token = run(4, prompt, first)  # warm-up: compiles / records graphs; positions are rewritten below
    sync(device)
    start = time.perf_counter()
    run(new_tokens - 1, prompt, token)
    sync(device)
    return (new_tokens - 1) / (time.perf_counter() - start)


@torch.inference_mode()
def prefill_time(model: Transformer, prompt: int, device: torch.device) -> float:
    tokens = torch.randint(0, model.args.vocab_size, (1, prompt), device=device)
    last = torch.tensor([prompt - 1], device=device)

    def run():
        cache = KVCache(model.args, 1, prompt, dtype=torch.bfloat16, device=device)
        model(tokens, cache=cache, logits_index=last)

    return timed(run, device, repeat=2)


def prefill_flops(args: ModelArgs, prompt: int) -> float:
    """Matmul FLOPs of one prompt: 2 per weight per token in the layers, plus causal attention (QK^T and PV)."""
    layer_weights = args.num_params() - args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) - args.dim
    attention = args.n_layers * 2 * 2 * args.dim * prompt * prompt / 2
    return 2 * layer_weights * prompt + attention + 2 * args.vocab_size * args.dim  # + one row of logits


def guarded(label: str, fn):
    try:
        return fn()
    except Exception as e:  # a failed phase is reported, the check goes on
        print(f"  {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", default="llama3.2-1b,llama3-8b")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--modes", default="eager,cuda-graphs",
                   help="decode variants to time, from eager, compiled, cuda-graphs (each compile takes ~1 minute)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    big = device.type == "cuda"
    bandwidth = copy_bandwidth(device, (4 << 30) if big else (256 << 20))
    mm = matmul_rate(device, 8192 if big else 1024)
    print(f"roofs: copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.1f} TFLOP/s\n", flush=True)
    rows = []
    for preset in args.presets.split(","):
        margs = ModelArgs.preset(preset, max_seq_len=args.prompt_tokens + args.new_tokens)
        start = time.perf_counter()
        model = random_model(margs, device)
        wbytes = weight_bytes(model)
        print(f"{preset}: {wbytes / 1e9:.2f} GB of bf16 weights (made in {time.perf_counter() - start:.1f} s)",
              flush=True)
        kv_bytes = 2 * margs.n_layers * margs.n_kv_heads * margs.head_dim * 2 * (args.prompt_tokens + args.new_tokens / 2)
        roof = bandwidth / (wbytes + kv_bytes)
        steps = {"eager": lambda: DecodeStep(model), "compiled": lambda: DecodeStep(model, compile=True),
                 "cuda-graphs": lambda: DecodeStep(model, cuda_graphs=True)}
        for mode in args.modes.split(","):
            step = steps[mode]()
            rate = guarded(f"{preset} decode ({mode})",
                           lambda: decode_rate(model, step, args.prompt_tokens, args.new_tokens, device))
            if rate is not None:
                compile_note = f", compiled in {step.compile_seconds:.0f} s" if step.compile_seconds else ""
                print(f"  decode {mode:11} {rate:8.1f} tok/s = {rate / roof:5.1%} of the {roof:.0f} tok/s roof"
                      f"{compile_note}", flush=True)
                rows.append((preset, f"decode {mode}", f"{rate:.1f} tok/s", f"{rate / roof:.0%} of {roof:.0f} tok/s"))
        seconds = guarded(f"{preset} prefill", lambda: prefill_time(model, args.prompt_tokens, device))
        if seconds is not None:
            rate = prefill_flops(margs, args.prompt_tokens) / seconds
            print(f"  prefill {args.prompt_tokens} tokens: {args.prompt_tokens / seconds:.0f} tok/s, "
                  f"{rate / 1e12:.1f} TFLOP/s = {rate / mm:.0%} of the matmul rate", flush=True)
            rows.append((preset, f"prefill {args.prompt_tokens}", f"{args.prompt_tokens / seconds:.0f} tok/s",
                         f"{rate / mm:.0%} of {mm / 1e12:.1f} TFLOP/s"))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else []
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
