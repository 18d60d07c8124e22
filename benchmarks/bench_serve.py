"""Serving throughput and latency: aggregate output tokens/s with 1, 4 and 8 concurrent streams, time to first
token and per-token latency (p50/p95), measured against `llama3 serve` over HTTP.

    python benchmarks/bench_serve.py                      # starts a server for the default model on a free port
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --model NAME   # an already running server

Every stream asks for exactly --max-tokens tokens (greedy, `ignore_eos`), so each level does the same work per
stream; the streams of one level start together. The server runs in its own process so the client's work does not
share its interpreter. Prints a markdown table and the N-stream / 1-stream throughput ratios; with --engine-alone
also the engine's own throughput without HTTP (stepped in this process), which separates batching efficiency from
the cost of the web side and the client on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

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


async def one_stream(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> StreamResult:
    # Plain httpx and json rather than the openai client: on a small machine the client's own parsing would
    # compete with the server for the same cores and blur the measurement.
    body = {"model": model, "messages": [{"role": "user", "content": poem_request(i)}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    result = StreamResult(started=time.perf_counter())
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


def engine_alone(model: str, streams: list[int], max_tokens: int) -> dict[int, float]:
    """Output tokens/s of the batching engine stepped on this thread, without HTTP: what the server could reach if
    its web side cost nothing."""
    import llama3
    from llama3.serve.engine import Engine, Request
    llm = llama3.load(model, prepack=True)  # as `llama3 serve` loads it
    results = {}
    for n in [1, *streams]:  # the first round warms up
        engine = Engine(llm.model, llm.tokenizer, max_batch=max(streams), max_context=2048)
        requests = [Request(llm.encode_chat([{"role": "user", "content": poem_request(i)}]), max_tokens=max_tokens,
                            ignore_eos=True, emit=lambda out: None) for i in range(n)]
        start = time.perf_counter()
        engine.submit(requests)
        while not all(r.finished for r in requests):
            engine.step()
        results[n] = n * max_tokens / (time.perf_counter() - start)
    return results


def start_server(model: str, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llama3.cli", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(max_batch), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 10 minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, help="CPU threads for the model (server and engine alone)")
    parser.add_argument("--engine-alone", action="store_true",
                        help="also measure the engine without HTTP, stepped in this process")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="extra `llama3 serve` options, e.g. --server-args --max-context 2048")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.threads:
        args.server_args += ["--threads", str(args.threads)]
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, max(args.streams), args.server_args)
    try:
        asyncio.run(run_level(url, args.model, 1, 8))  # warm-up: first-call allocations, page faults
        rows = [asyncio.run(run_level(url, args.model, n, args.max_tokens)) for n in args.streams]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    alone = {}
    if args.engine_alone:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        alone = engine_alone(args.model, args.streams, args.max_tokens)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"model {args.model}, {args.max_tokens} tokens per stream, server options: "
          f"{' '.join(args.server_args) or 'defaults'}, {os.cpu_count()} cpus, load average {load}\n")
    print("| streams | output tok/s | TTFT p50 / p95 (ms) | per-token p50 / p95 (ms) | inter-chunk p50 / p95 (ms) "
          "| engine alone tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["engine_alone_tok_per_s"] = alone.get(r["streams"])
        engine = f"{alone[r['streams']]:.1f}" if alone else "-"
        print(f"| {r['streams']} | {r['tok_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} "
              f"| {r['tpot_p50_ms']:.1f} / {r['tpot_p95_ms']:.1f} | {r['itl_p50_ms']:.1f} / {r['itl_p95_ms']:.1f} "
              f"| {engine} |")
    base = next((r for r in rows if r["streams"] == 1), None)
    if base:
        for r in rows:
            if r["streams"] > 1:
                print(f"\n{r['streams']} streams / 1 stream: {r['tok_per_s'] / base['tok_per_s']:.2f}x", end="")
                if alone:
                    print(f" (engine alone: {alone[r['streams']] / alone[1]:.2f}x)", end="")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
