"""Throughput of `llama3 data prepare` with 1 and with 2 worker processes, in one run.

The corpus is real prose every Python has: the standard library's module documentation (one document
per module, as in the built-in corpus), written `--copies` times so the run lasts long enough to time
(later copies are exact duplicates: still parsed, filtered, hashed and tokenized, then dropped).
Default quality filters and MinHash near-dedup are on, so every stage of the pipeline is measured.

    python benchmarks/bench_data_prepare.py [--copies 8] [--repeats 3] [--tokenizer llama3|PATH]

(from the repository root, with the package installed: pip install -e .)

Prints, per worker count, the best wall time of `--repeats` alternating runs, throughput, and the CPU
seconds spent by all processes; then the wall-time ratio (goal >= 1.8x on two free cores). On a
machine shared with other jobs the wall ratio measures the neighbours as much as the code, so two more
numbers put it in context: the ceiling, i.e. the same ratio for perfectly parallel pure-Python work
measured right before, and the CPU ratio (1-worker CPU / 2-worker CPU; 1.0 = no parallel overhead).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

from llama3.data.default_corpus import stdlib_documents
from llama3.data.minhash import MinHashConfig
from llama3.data.prepare import PrepareConfig, load_tokenizer, prepare


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def parallel_ceiling(n: int = 5_000_000) -> float:
    """Wall-time ratio of two independent CPU-bound tasks run one after the other vs in 2 processes:
    what this machine gives right now to work with no overhead at all (2.0 on two idle cores)."""
    start = time.perf_counter()
    _spin(n), _spin(n)
    serial = time.perf_counter() - start
    with multiprocessing.Pool(2) as pool:
        start = time.perf_counter()
        pool.map(_spin, [n, n])
        parallel = time.perf_counter() - start
    return serial / parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="times the corpus is written (more = longer run)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per worker count; the best counts")
    parser.add_argument("--tokenizer", default="llama3", help="'llama3' or a tokenizer.model path")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    modules = list(stdlib_documents())
    config = PrepareConfig(near_dedup=MinHashConfig())
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "corpus.jsonl"
        source.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in modules) * args.copies, encoding="utf-8")
        megabytes = source.stat().st_size / 1e6
        documents = len(modules) * args.copies
        print(f"corpus: {documents:,} documents, {megabytes:.1f} MB JSONL; quality filters, exact and near dedup on")

        ceiling = parallel_ceiling()
        wall = {1: float("inf"), 2: float("inf")}
        cpu = {1: float("inf"), 2: float("inf")}
        outputs = {}
        for repeat in range(args.repeats):
            for workers in (1, 2):
                out = Path(tmp) / f"out{workers}-{repeat}"
                cpu_start, start = cpu_seconds(), time.perf_counter()
                stats = prepare([source], out, tokenizer, config, workers=workers, progress=False)
                wall[workers] = min(wall[workers], time.perf_counter() - start)
                cpu[workers] = min(cpu[workers], cpu_seconds() - cpu_start)
                outputs[workers] = out
        for workers in (1, 2):
            print(
                f"workers={workers}: {wall[workers]:6.2f} s  {documents / wall[workers]:7,.0f} docs/s  "
                f"{megabytes / wall[workers]:5.2f} MB/s  cpu {cpu[workers]:6.2f} s  "
                f"({stats.documents_kept:,} kept, {stats.tokens:,} tokens)"
            )
        same = all(
            (outputs[1] / name).read_bytes() == (outputs[2] / name).read_bytes()
            for name in ("index.json", "stats.json", "shard_00000.bin")
        )
        speedup = wall[1] / wall[2]
        print(f"speedup 2 workers / 1 worker: {speedup:.2f}x wall (goal >= 1.8x); identical output: {same}")
        print(f"machine ceiling now: {ceiling:.2f}x for perfectly parallel work, so {speedup / ceiling:.0%} of it; "
              f"cpu ratio {cpu[1] / cpu[2]:.2f}, i.e. at most {2 * cpu[1] / cpu[2]:.2f}x on two idle cores")


if __name__ == "__main__":
    main()
