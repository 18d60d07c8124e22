"""`llama3 bench`: your own numbers on your own machine: load time, prefill and decode speed, time to first token
and peak memory, for a model as it is and (optionally) quantized, compiled or with speculative decoding.

The measuring helpers here are shared with benchmarks/bench_inference.py, which runs the same measurements for
HF transformers and llama.cpp side by side.
"""

from __future__ import annotations

import gc
import multiprocessing
import resource
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from .hub import DEFAULT_MODEL

# A fixed English text (public domain: the opening of the US Declaration of Independence, repeated as needed) so
# every run measures the same tokens.
PROMPT_TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands which "
    "have connected them with another, and to assume among the powers of the earth, the separate and equal station "
    "to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind "
    "requires that they should declare the causes which impel them to the separation. We hold these truths to be "
    "self-evident, that all men are created equal, that they are endowed by their Creator with certain unalienable "
    "Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure these rights, "
    "Governments are instituted among Men, deriving their just powers from the consent of the governed, That "
    "whenever any Form of Government becomes destructive of these ends, it is the Right of the People to alter or "
    "to abolish it, and to institute new Government, laying its foundation on such principles and organizing its "
    "powers in such form, as to them shall seem most likely to effect their Safety and Happiness. "
)


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens of the benchmark text (repeated as needed) in this tokenizer."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(PROMPT_TEXT)
    return ids[:n_tokens]


def load_tokenizer(model: str):
    """The tokenizer of a model without reading its weights."""
    from .hub import resolve
    from .weights import WeightsError, detect_format, read_tokenizer
    path = resolve(model)
    if detect_format(path) == "gguf":
        from .tokenizer import BPETokenizer
        from .weights.gguf import GGUFFile
        return BPETokenizer.from_gguf(GGUFFile(path if path.is_file() else sorted(path.glob("*.gguf"))[0]))
    tokenizer, _ = read_tokenizer(path)
    if tokenizer is None:
        raise WeightsError(f"{path}: no tokenizer found next to the weights")
    return tokenizer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakMemory:
    """Peak resident memory while the block runs, sampled every few milliseconds (ru_maxrss only ever grows, so it
    cannot isolate one phase). `peak` is in bytes, `grown` the peak minus the memory at entry."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def grown(self) -> int:
        return self.peak - self.start


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_mkldnn:  # oneDNN's opaque layout has no storage to share
            total += t.numel() * t.element_size()
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass
class Run:
    """One generation: time to first token (the prompt's prefill plus choosing a token) and decode speed."""
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_s: float
    tokens: list[int] = field(repr=False, default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s


def time_stream(stream: Iterator[int], prompt_tokens: int) -> Run:
    """Time a token iterator: until its first token, then the rest."""
    start = time.perf_counter()
    tokens = [next(stream)]
    first = time.perf_counter()
    tokens += list(stream)
    end = time.perf_counter()
    return Run(prompt_tokens, len(tokens), first - start, end - first, tokens)


def ours_stream(llm, ids: list[int], new_tokens: int, speculative=None) -> Iterator[int]:
    """Greedy tokens from our generation loop (no stop tokens: exactly new_tokens of them)."""
    from .generate import generate_tokens
    if speculative is not None:
        yield from speculative.generate(ids, max_new_tokens=new_tokens)
        return
    for step in generate_tokens(llm.model, [ids], max_new_tokens=new_tokens, step=llm.decode_step):
        yield step[0]


@dataclass
class Result:
    name: str
    load_s: float
    load_peak_mb: float
    weights_mb: float
    runs: list[Run]
    peak_mb: float
    compile_s: float | None = None
    note: str = ""

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def measure_ours(model: str, *, quantize: str | None, prepack: bool, compile: bool, prompt_tokens: int,
                 new_tokens: int, rounds: int, draft: str | None = None, k: int = 4) -> Result:
    """Load (timed, with its peak memory), warm up, then `rounds` timed greedy generations."""
    with PeakMemory(interval=0.02) as whole:  # sparse sampling: it runs alongside the timed generations
        result = _measure_ours(model, quantize=quantize, prepack=prepack, compile=compile,
                               prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds, draft=draft, k=k)
    result.peak_mb = whole.peak / 1e6
    return result


def _measure_ours(model, *, quantize, prepack, compile, prompt_tokens, new_tokens, rounds, draft, k) -> Result:
    from .fast import can_prepack, prepack as prepack_linears
    from .llama import load
    with PeakMemory() as mem:
        start = time.perf_counter()
        llm = load(model, quantize=quantize, compile=compile)
        load_s = time.perf_counter() - start
    weights_mb = tensor_bytes(llm.model) / 1e6  # as loaded (prepacking adds a copy of a tied output matrix)
    name = f"llama3 {quantize or str(llm.model.norm.weight.dtype).removeprefix('torch.')}"
    prepack_s = None
    if prepack and can_prepack(llm.model):  # timed apart from the load: an optional step of its own
        start = time.perf_counter()
        prepack_linears(llm.model)
        prepack_s = time.perf_counter() - start
        name += " oneDNN"
    speculative = None
    if draft:
        from .speculative import SpeculativeDecoder
        draft_model = load(model, quantize=draft).model
        speculative = SpeculativeDecoder(llm.model, draft_model, k=k, compile=compile)
        name += f" + {draft} draft (k={k})"
    if compile:
        name += ", compiled"
    ids = prompt_ids(llm.tokenizer, prompt_tokens)
    time_stream(ours_stream(llm, ids, min(new_tokens, 8), speculative), len(ids))  # warm-up (compiles if asked)
    runs = [time_stream(ours_stream(llm, ids, new_tokens, speculative), len(ids)) for _ in range(rounds)]
    compile_s = llm.decode_step.compile_seconds if speculative is None else \
        sum(s.compile_seconds or 0 for s in (speculative.target_step, speculative.draft_step))
    notes = [f"prepack {prepack_s:.2f} s"] if prepack_s is not None else []
    if speculative:
        notes.append(f"acceptance {speculative.accepted / max(1, speculative.proposed):.0%}")
    return Result(name, load_s, mem.grown / 1e6, weights_mb, runs, 0.0, compile_s,
                  ", ".join(notes))


def format_table(results: list[Result], peak_header: str = "peak RSS MB") -> str:
    header = ["", "load s", "load peak MB (x weights)", "prefill tok/s", "TTFT ms", "decode tok/s", peak_header]
    rows = [header]
    for r in results:
        load = f"{r.load_s:.2f}" + (f" (+{r.compile_s:.0f} compile)" if r.compile_s else "")
        rows.append([r.name + (f" [{r.note}]" if r.note else ""), load,
                     f"{r.load_peak_mb:.0f} ({r.load_peak_mb / r.weights_mb:.2f}x of {r.weights_mb:.0f})",
                     f"{r.median('prefill_tok_s'):.0f}", f"{1e3 * r.median('ttft_s'):.0f}",
                     f"{r.median('decode_tok_s'):.1f}", f"{r.peak_mb:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def bench(*, model: str = DEFAULT_MODEL, prompt_tokens: int = 512, new_tokens: int = 128, rounds: int = 3,
          quantize: list[str] | None = None, prepack: bool = True, compile: bool = False, draft: str | None = None,
          k: int = 4, threads: int | None = None) -> None:
    """Measure load time, prefill and decode speed, time to first token and peak memory on this machine.

    Args:
        model: known model name, .gguf file, or Meta / Hugging Face / quantized checkpoint directory
        prompt_tokens: prompt length for the prefill measurement
        new_tokens: tokens generated per run (greedy, no early stop)
        rounds: measured runs per configuration (the median is shown)
        quantize: also measure these weight formats (int8, int4)
        prepack: reorder fp32 linear weights for oneDNN on CPU (see llama3/fast.py)
        compile: compile the decode step with torch.compile (its one-time cost is shown next to the load time)
        draft: also measure speculative decoding with the model quantized to this format as the draft (int8, int4)
        k: tokens drafted per speculative step
        threads: CPU threads (torch's choice if not given)
    """
    from .hub import resolve
    resolve(model)  # pull a known model once, before the measuring processes start
    common = dict(prepack=prepack, compile=compile, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds)
    configs = [dict(quantize=scheme) for scheme in [None, *(quantize or [])]]
    if draft:
        configs.append(dict(quantize=None, draft=draft, k=k))
    results = []
    # Each configuration in a fresh process: its load time and memory are its own (a freed model's memory stays
    # with the allocator and would flatter the next one's).
    spawn = multiprocessing.get_context("spawn")
    for config in configs:
        what = f"a {config['draft']} draft" if config.get("draft") else config["quantize"] or "the weights as stored"
        print(f"measuring {what} ...", flush=True)
        with ProcessPoolExecutor(1, mp_context=spawn, initializer=_set_threads, initargs=(threads,)) as pool:
            results.append(pool.submit(measure_ours, model, **config, **common).result())
    used = threads or torch.get_num_threads()
    print(f"\n{model}: prompt {prompt_tokens} tokens, {new_tokens} new tokens, {used} threads, median of {rounds}\n")
    print(format_table(results))


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
