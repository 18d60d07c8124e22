"""The server's metrics in Prometheus' text exposition format (GET /metrics).

Small on purpose: counters, gauges read at scrape time, and cumulative histograms, each safe to update from the
engine thread and the event loop at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            values = dict(self._values) or {(): 0.0}
        lines += [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(values.items())]
        return lines


class Gauge:
    """A value read when the metrics are scraped."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read():g}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip([f"{b:g}" for b in self.buckets] + ["+Inf"], counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"{self.name}_sum {total:g}", f"{self.name}_count {cumulative}"]
        return lines


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    """Every metric the server exports. The engine's queue and batch gauges are attached once the engine exists."""

    def __init__(self):
        self.requests = Counter("llama3_requests_total", "HTTP requests answered, by route and status code")
        self.prompt_tokens = Counter("llama3_prompt_tokens_total", "Prompt tokens prefilled")
        self.generation_tokens = Counter("llama3_generation_tokens_total", "Tokens generated")
        self.request_latency = Histogram("llama3_request_duration_seconds",
                                         "Time from receiving a completion request to its last token",
                                         LATENCY_BUCKETS)
        self.time_to_first_token = Histogram("llama3_time_to_first_token_seconds",
                                             "Time from receiving a completion request to its first token",
                                             LATENCY_BUCKETS)
        self.batch_size = Histogram("llama3_batch_size", "Requests decoded together in one forward pass",
                                    (1, 2, 4, 8, 16, 32, 64, 128))
        self.prefix_cache_queries = Counter("llama3_prefix_cache_queries_total",
                                            "Prompt tokens looked up in the prefix cache when admitted")
        self.prefix_cache_hits = Counter("llama3_prefix_cache_hits_total",
                                         "Prompt tokens whose keys/values came from the prefix cache")
        self.preemptions = Counter("llama3_preemptions_total",
                                   "Running requests set back to recompute later because the KV cache was full")
        self.gauges: list[Gauge] = []

    def watch_engine(self, engine) -> None:
        self.gauges = [
            Gauge("llama3_queue_depth", "Requests accepted but not yet decoding", lambda: engine.num_waiting),
            Gauge("llama3_running_requests", "Requests being decoded", lambda: engine.num_running),
            Gauge("llama3_max_batch", "Most requests decoded together", lambda: engine.max_batch),
            Gauge("llama3_kv_cache_blocks_used", "KV-cache blocks held by requests", lambda: engine.pool.num_used),
            Gauge("llama3_kv_cache_blocks", "KV-cache blocks in all", lambda: engine.pool.num_blocks - 1),
            Gauge("llama3_prefix_cache_hit_rate", "Share of admitted prompt tokens found in the prefix cache",
                  lambda: self.prefix_cache_hits.value() / max(self.prefix_cache_queries.value(), 1)),
        ]

    def render(self) -> str:
        metrics = [self.requests, self.prompt_tokens, self.generation_tokens, self.prefix_cache_queries,
                   self.prefix_cache_hits, self.preemptions, self.request_latency,
                   self.time_to_first_token, self.batch_size, *self.gauges]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
