"""llama3 against HF transformers and llama.cpp on the same GGUF file, in one run, alternating.

    python benchmarks/bench_inference.py                      # default model, every engine, 2 threads
    python benchmarks/bench_inference.py --rounds 5 --compile --engines ours-fp32,ours-int8,hf-fp32,llamacpp

Engines: ours-fp32 (the GGUF dequantized to fp32), ours-int8, ours-int4 (weight-only, bf16 activations; GGUF 4-bit
blocks repacked as they are), ours-spec (fp32 target with its int4 copy drafting), hf-fp32 (transformers loading
the same GGUF, fp32), llamacpp (llama-cpp-python on the GGUF file itself).

Each engine lives in its own worker process, so its load time and memory are its own. All get the same prompt
token ids, thread count and token counts (greedy, no early stop). After one warm-up run each, the parent runs the
engines in turn, rotating the order every round, so a noisy neighbour slows them alike: compare the ratios of one
run, not absolute figures across runs. transformers (+ gguf, accelerate) and llama-cpp-python are bench-only
peers; an engine whose package is missing is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llama3.bench import (PeakMemory, Result, Run, format_table, ours_stream, prompt_ids, rss_bytes,  # noqa: E402
                          tensor_bytes, time_stream)
from llama3.hub import DEFAULT_MODEL, resolve  # noqa: E402

# (figure, ours, peer, at least this ratio): the targets of this benchmark.
TARGETS = [
    ("decode_tok_s", "ours-fp32", "hf-fp32", 1.8),
    ("decode_tok_s", "ours-int8", "llamacpp", 1.0),
    ("decode_tok_s", "ours-int4", "llamacpp", 1.2),
    ("prefill_tok_s", "ours-fp32", "hf-fp32", 1.3),
    ("prefill_tok_s", "ours-fp32", "llamacpp", 3.0),
]


# ---- engines (run inside the worker processes) -------------------------------------------------------------------

class Ours:
    def __init__(self, args, quantize: str | None = None, draft: str | None = None):
        from llama3.fast import can_prepack, prepack
        from llama3.llama import load
        with PeakMemory() as mem:
            start = time.perf_counter()
            self.llm = load(args.model, quantize=quantize, compile=args.compile)
            load_s = time.perf_counter() - start
        self.info = {"load_s": load_s, "load_peak_mb": mem.grown / 1e6, "weights_mb": tensor_bytes(self.llm.model) / 1e6}
        self.notes = []
        if can_prepack(self.llm.model) and not args.no_prepack:  # fp32: oneDNN linears, timed apart from the load
            start = time.perf_counter()
            prepack(self.llm.model)
            self.notes.append(f"prepack {time.perf_counter() - start:.2f} s")
        self.speculative = None
        if draft:
            from llama3.speculative import SpeculativeDecoder
            self.speculative = SpeculativeDecoder(self.llm.model, load(args.model, quantize=draft).model, k=args.k,
                                                  compile=args.compile)

    def run(self, ids: list[int], n: int) -> Run:
        return time_stream(ours_stream(self.llm, ids, n, self.speculative), len(ids))

    def extra(self) -> dict:
        if self.speculative is None:
            return {"compile_s": self.llm.decode_step.compile_seconds, "note": ", ".join(self.notes)}
        s = self.speculative
        acceptance = f"acceptance {s.accepted / max(1, s.proposed):.0%}"
        return {"compile_s": sum(st.compile_seconds or 0 for st in (s.target_step, s.draft_step)) or None,
                "note": ", ".join(self.notes + [acceptance])}


class HFTransformers:
    def __init__(self, args):
        from transformers import AutoModelForCausalLM
        path = resolve(args.model)
        with PeakMemory() as mem:
            start = time.perf_counter()
            self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
            load_s = time.perf_counter() - start
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.info = {"load_s": load_s, "load_peak_mb": mem.grown / 1e6, "weights_mb": weights / 1e6}

    def run(self, ids: list[int], n: int) -> Run:
        from transformers.generation.streamers import BaseStreamer
        times: list[float] = []

        class Clock(BaseStreamer):  # generate() hands it the prompt first, then each new token as it is chosen
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        tokens = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, streamer=Clock(), pad_token_id=0)
        new = out[0, len(ids):].tolist()
        return Run(len(ids), len(new), times[1] - start, times[-1] - times[1], new)

    def extra(self) -> dict:
        return {}


class LlamaCpp:
    def __init__(self, args):
        from llama_cpp import Llama
        path = resolve(args.model)
        with PeakMemory() as mem:
            start = time.perf_counter()
            batch = max(512, args.prompt_tokens)  # the whole prompt in one batch
            self.llm = Llama(str(path), n_ctx=args.prompt_tokens + args.new_tokens + 16, n_batch=batch,
                             n_ubatch=batch, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            load_s = time.perf_counter() - start
        self.info = {"load_s": load_s, "load_peak_mb": mem.grown / 1e6, "weights_mb": path.stat().st_size / 1e6}

    def run(self, ids: list[int], n: int) -> Run:
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        tokens = [llm.sample(temp=0.0)]
        first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tokens[-1]])
            tokens.append(llm.sample(temp=0.0))
        return Run(len(ids), n, first - start, time.perf_counter() - first, tokens)

    def extra(self) -> dict:
        return {}


ENGINES = {
    "ours-fp32": ("llama3 fp32 (oneDNN prepacked)", lambda a: Ours(a)),
    "ours-int8": ("llama3 int8", lambda a: Ours(a, quantize="int8")),
    "ours-int4": ("llama3 int4", lambda a: Ours(a, quantize="int4")),
    "ours-spec": ("llama3 fp32 + int4 draft", lambda a: Ours(a, draft="int4")),
    "hf-fp32": ("HF transformers fp32", HFTransformers),
    "llamacpp": ("llama.cpp (GGUF as stored)", LlamaCpp),
}


def worker(args) -> None:
    """Load one engine, then answer {"n": tokens, "ids": [...]} lines with one timed run each."""
    protocol, sys.stdout = sys.stdout, sys.stderr  # library chatter must not mix with the replies

    def reply(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    torch.set_num_threads(args.threads)
    # Peak RSS sampled from here on, less the interpreter with torch and llama3 imported (~300 MB, the same in every
    # worker; ru_maxrss would also count the parent's memory at the fork).
    with PeakMemory(interval=0.02) as whole:
        try:
            engine = ENGINES[args.worker][1](args)
        except ImportError as e:
            reply({"error": f"not installed: {e.name or e}"})
            return
        reply(engine.info)
        for line in sys.stdin:
            request = json.loads(line)
            run = engine.run(request["ids"], request["n"])
            reply({"ttft_s": run.ttft_s, "decode_s": run.decode_s, "tokens": run.tokens, "new_tokens": run.new_tokens,
                   "peak_mb": (max(whole.peak, rss_bytes()) - whole.start) / 1e6, **engine.extra()})


# ---- the parent: start workers, alternate rounds, report ---------------------------------------------------------

class Worker:
    def __init__(self, engine: str, args):
        cmd = [sys.executable, __file__, "--worker", engine, "--model", args.model, "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--k", str(args.k)]
        cmd += ["--compile"] * args.compile + ["--no-prepack"] * args.no_prepack
        self.engine = engine
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        self.runs: list[Run] = []
        self.last: dict = {}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"worker exited with code {self.proc.wait()}"}
        return json.loads(line)

    def run(self, ids: list[int], n: int) -> Run:
        self.proc.stdin.write(json.dumps({"ids": ids, "n": n}) + "\n")
        self.proc.stdin.flush()
        self.last = self._read()
        if "error" in self.last:
            raise RuntimeError(f"{self.engine}: {self.last['error']}")
        return Run(len(ids), self.last["new_tokens"], self.last["ttft_s"], self.last["decode_s"], self.last["tokens"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def encode_prompt(model: str, n: int) -> list[int]:
    from llama3.bench import load_tokenizer
    return prompt_ids(load_tokenizer(model), n)


def report(workers: list[Worker], args) -> dict:
    results = {w.engine: Result(ENGINES[w.engine][0], w.info["load_s"], w.info["load_peak_mb"], w.info["weights_mb"],
                                w.runs, w.last["peak_mb"], w.last.get("compile_s"), w.last.get("note", ""))
               for w in workers}
    print(f"\n{args.model}: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (greedy), "
          f"{args.threads} threads, median of {args.rounds} alternating rounds\n")
    print(format_table(list(results.values()), peak_header="peak MB over imports"))
    print("\ntargets (ratios within this run):")
    summary = {"targets": []}
    for figure, ours, peer, goal in TARGETS:
        if ours in results and peer in results:
            ratio = results[ours].median(figure) / results[peer].median(figure)
            verdict = "met" if ratio >= goal else "MISSED"
            print(f"  {figure:14} {ours:10} / {peer:9} = {ratio:5.2f}x  (target >= {goal}x: {verdict})")
            summary["targets"].append({"figure": figure, "ours": ours, "peer": peer, "ratio": ratio, "goal": goal})
    if "ours-fp32" in results:
        r = results["ours-fp32"]
        print(f"  load           ours-fp32 = {r.load_s:.2f} s  (target <= 1 s: {'met' if r.load_s <= 1 else 'MISSED'})")
        x = r.load_peak_mb / r.weights_mb
        print(f"  load memory    ours-fp32 = {x:.2f}x the weights  (target <= 1.3x: {'met' if x <= 1.3 else 'MISSED'})")
    if "ours-fp32" in results and "hf-fp32" in results:
        a, b = results["ours-fp32"].runs[-1].tokens, results["hf-fp32"].runs[-1].tokens
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"  greedy tokens: ours-fp32 and hf-fp32 agree on the first {same} of {len(a)}")
    summary["results"] = {k: {"load_s": r.load_s, "load_peak_mb": r.load_peak_mb, "weights_mb": r.weights_mb,
                              "prefill_tok_s": r.median("prefill_tok_s"), "ttft_s": r.median("ttft_s"),
                              "decode_tok_s": r.median("decode_tok_s"), "peak_mb": r.peak_mb, "compile_s": r.compile_s}
                          for k, r in results.items()}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="a GGUF file or known model name (all engines read it)")
    p.add_argument("--engines", default="ours-fp32,ours-int8,ours-int4,hf-fp32,llamacpp",
                   help=f"comma-separated, from: {', '.join(ENGINES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="compile our decode step (torch.compile)")
    p.add_argument("--no-prepack", action="store_true", help="keep our fp32 linears on torch's default (MKL) path")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per step (ours-spec)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    ids = encode_prompt(args.model, args.prompt_tokens)
    workers = []
    for engine in engines:  # one at a time, so each load has the machine to itself
        print(f"loading {engine} ...", file=sys.stderr, flush=True)
        w = Worker(engine, args)
        if "error" in w.info:
            print(f"  skipped {engine}: {w.info['error']}", file=sys.stderr)
            w.close()
            continue
        w.run(ids, 8)  # warm-up (and compilation, with --compile)
        workers.append(w)
    for r in range(args.rounds):
        order = workers[r % len(workers):] + workers[:r % len(workers)]
        for w in order:
            w.runs.append(w.run(ids, args.new_tokens))
            print(f"round {r + 1}: {w.engine:10} decode {w.runs[-1].decode_tok_s:6.1f} tok/s, "
                  f"prefill {w.runs[-1].prefill_tok_s:6.0f} tok/s", file=sys.stderr, flush=True)
    summary = report(workers, args)
    for w in workers:
        w.close()
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
