"""Continuous batching: one thread runs the model for every request in flight.

Each running request owns one row of a static KV cache. Every engine step decodes one token for all running requests
in a single batched forward pass, then advances the prompt of at most one new request by one chunk (chunked prefill):
a long prompt costs the running streams one chunk of compute per step instead of its whole prefill, and requests
join or leave between steps without anyone waiting for a batch to drain.

Running requests always occupy cache rows 0..n-1, which is exactly the layout the model's cache uses for a batch of
n rows. When a request finishes, the last running row is moved into its place. A new prompt is prefilled in a
separate one-row cache and copied into row n when it is complete.

Torch releases the GIL while it computes, so the web server's event loop stays responsive while this thread works;
the two sides meet only in `submit` (a locked queue) and each request's `emit` callback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..generate import SamplingParams, TextStream, make_generator, sample
from ..model import KVCache, Transformer
from .metrics import ServeMetrics

log = logging.getLogger("llama3.serve")


class QueueFull(RuntimeError):
    """The engine already holds as many waiting requests as it accepts."""


@dataclass
class Output:
    """What one engine step produced for one request. `text` may be empty: the tokens so far may end in an
    incomplete UTF-8 character or the start of a stop string. The last output has `finish_reason` set."""

    text: str
    finish_reason: str | None = None  # "stop" (end of turn or stop string), "length" (max_tokens), "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Request:
    """One completion: a tokenized prompt, how to sample it, and where its outputs go.

    `emit` is called from the engine thread with every `Output`; it must not block.
    """

    def __init__(self, prompt: list[int], *, max_tokens: int, emit: Callable[[Output], None],
                 params: SamplingParams = SamplingParams(), stop: Iterable[str] = (), ignore_eos: bool = False):
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.emit = emit
        self.params = params
        self.stop = list(stop)
        self.ignore_eos = ignore_eos
        self.cancelled = False  # set by any thread, read by the engine thread
        # Engine-side state.
        self.prefilled = 0  # prompt tokens already in the prefill cache
        self.cached = 0  # positions 0..cached-1 hold keys/values in this request's cache row
        self.completion_tokens = 0
        self.last_token = -1  # sampled but not yet fed to the model
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.finished = False

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the engine frees the request's slot at its next step."""
        self.cancelled = True


class Engine:
    def __init__(self, model: Transformer, tokenizer, *, max_batch: int = 8, max_context: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256, metrics: ServeMetrics | None = None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_context = min(max_context or model.args.max_seq_len, model.args.max_seq_len)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or ServeMetrics()
        self.stop_ids = frozenset(tokenizer.stop_ids)
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.cache = KVCache(model.args, max_batch, self.max_context, dtype=weight.dtype, device=self.device)
        self.prefill_cache = KVCache(model.args, 1, self.max_context, dtype=weight.dtype, device=self.device)
        self._waiting: deque[Request] = deque()  # guarded by _cond
        self._cond = threading.Condition()
        self._running: list[Request] = []  # engine thread only; _running[i] lives in cache row i
        self._prefilling: Request | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the engine thread itself died

    # ---- the caller's side (any thread) ----------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="llama3-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for req in [*self._waiting, *self._running, *([self._prefilling] if self._prefilling else [])]:
            self._fail(req, "the server is shutting down")
        self._waiting.clear()
        self._running.clear()
        self._prefilling = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none). Raises QueueFull when the queue has no room for all of them."""
        for req in requests:
            if len(req.prompt) >= self.max_context:
                raise ValueError(f"the prompt has {len(req.prompt)} tokens; the context is {self.max_context}")
            req.max_tokens = min(req.max_tokens, self.max_context - len(req.prompt))
        with self._cond:
            if len(self._waiting) + len(requests) > self.max_queue + self._free_slots():
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting "
                                f"(at most {self.max_queue} may wait); retry later")
            self._waiting.extend(requests)
            self._cond.notify()

    def cancel(self, requests: Iterable[Request]) -> None:
        for req in requests:
            req.cancel()
        with self._cond:
            self._cond.notify()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + (self._prefilling is not None)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def _free_slots(self) -> int:
        return self.max_batch - len(self._running) - (self._prefilling is not None)

    # ---- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._running or self._prefilling):
                        self._cond.wait()
                    if self._stopping:
                        return
                try:
                    self.step()
                except Exception as e:  # a failed forward pass fails the requests in flight, not the server
                    log.exception("engine step failed")
                    for req in [*self._running, *([self._prefilling] if self._prefilling else [])]:
                        self._fail(req, f"generation failed: {type(e).__name__}: {e}")
                    self._running.clear()
                    self._prefilling = None
        except BaseException as e:
            self.error = e
            raise

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, decode one token for every running request, advance one prefill chunk."""
        self._drop_cancelled()
        if self._running:
            self._decode()
        if self._prefilling is None and len(self._running) < self.max_batch:
            self._prefilling = self._next_waiting()
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)

    def _next_waiting(self) -> Request | None:
        with self._cond:
            while self._waiting:
                req = self._waiting.popleft()
                if not req.cancelled:
                    req.stream = TextStream(self.tokenizer, req.stop)
                    req.generator = make_generator(req.params.seed, self.device)
                    return req
        return None

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._running))):
            if self._running[i].cancelled:
                self._release(i)
        if self._prefilling is not None and self._prefilling.cancelled:
            self._prefilling = None
        with self._cond:
            if any(r.cancelled for r in self._waiting):
                self._waiting = deque(r for r in self._waiting if not r.cancelled)

    def _decode(self) -> None:
        running = self._running
        tokens = torch.tensor([[r.last_token] for r in running], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.cached] for r in running], device=self.device)  # (B, 1)
        logits = self.model(tokens, positions, self.cache)[:, -1]  # (B, vocab)
        self.metrics.batch_size.observe(len(running))
        next_ids = self._sample(logits, running)
        for i in reversed(range(len(running))):  # backwards: _release moves a later row into row i
            running[i].cached += 1
            if self._accept(running[i], next_ids[i]):
                self._release(i)

    def _prefill_chunk(self, req: Request) -> None:
        start = req.prefilled
        chunk = req.prompt[start:start + self.prefill_chunk]
        tokens = torch.tensor([chunk], device=self.device)  # (1, T)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]  # (1, T)
        last = torch.tensor([len(chunk) - 1], device=self.device)
        logits = self.model(tokens, positions, self.prefill_cache, logits_index=last)[:, -1]  # (1, vocab)
        req.prefilled += len(chunk)
        if req.prefilled < len(req.prompt):
            return
        # The prompt is in: move its keys/values into the next free row of the batch cache and start decoding.
        self._prefilling = None
        row, n = len(self._running), len(req.prompt)
        self.cache.k[:, row, :n] = self.prefill_cache.k[:, 0, :n]
        self.cache.v[:, row, :n] = self.prefill_cache.v[:, 0, :n]
        req.cached = n
        self._running.append(req)
        self.metrics.prompt_tokens.inc(n)
        if self._accept(req, self._sample(logits, [req])[0]):
            self._release(row)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        ids = logits.argmax(dim=-1).tolist()  # greedy rows in one go; sampled rows one by one with their own settings
        for i, req in enumerate(requests):
            if req.params.temperature > 0:
                ids[i] = int(sample(logits[i:i + 1], req.params, req.generator)[0])
        return ids

    def _accept(self, req: Request, token: int) -> bool:
        """Take one sampled token: emit its text, and finish the request when it is done. True when finished."""
        req.completion_tokens += 1
        req.last_token = token
        self.metrics.generation_tokens.inc()
        if token in self.stop_ids and not req.ignore_eos:  # end of turn: not part of the text
            return self._finish(req, req.stream.finish(), "stop")
        text = req.stream.push(token)
        if req.stream.stopped:
            return self._finish(req, text, "stop")
        if req.completion_tokens >= req.max_tokens:
            return self._finish(req, text + req.stream.finish(), "length")
        self._emit(req, Output(text))
        return False

    def _finish(self, req: Request, text: str, reason: str) -> bool:
        req.finished = True
        self._emit(req, Output(text, reason, len(req.prompt), req.completion_tokens))
        return True

    def _fail(self, req: Request, message: str) -> None:
        if not req.finished:
            req.finished = True
            self._emit(req, Output("", "error", len(req.prompt), req.completion_tokens, error=message))

    def _emit(self, req: Request, out: Output) -> None:
        try:
            req.emit(out)
        except Exception:  # the listener is gone (e.g. its event loop closed): stop working for it
            log.debug("dropping output of a request whose listener failed", exc_info=True)
            req.cancelled = True

    def _release(self, i: int) -> None:
        """Free cache row i; the last running request moves into it so rows 0..n-1 stay the running ones."""
        last = self._running.pop()
        if i < len(self._running):
            n = last.cached
            self.cache.k[:, i, :n] = self.cache.k[:, len(self._running), :n]
            self.cache.v[:, i, :n] = self.cache.v[:, len(self._running), :n]
            self._running[i] = last


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Block until the engine has nothing waiting or running (tests, shutdown). True if it became idle."""
    deadline = time.monotonic() + timeout
    while engine.num_waiting or engine.num_running:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
