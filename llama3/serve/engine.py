"""Continuous batching over a paged KV cache: one thread runs the model for every request in flight.

Every engine step decodes one token for all running requests in a single batched forward pass, then spends at most
`prefill_chunk` prompt tokens (the step's token budget) on new requests: either several whole short prompts together
in one padded forward pass, or the next chunk of one long prompt (chunked prefill). A long prompt thus costs the
running streams one chunk of compute per step instead of its whole prefill, and requests join or leave between
steps without anyone waiting for a batch to drain.

Keys and values live in a `BlockPool` (paged.py): a request holds blocks for the positions it has, taken as it
grows and given back when it ends, so how many requests run at once is set by the tokens they hold. A request is
admitted when the pool can hold its whole prompt; its prompt's longest cached prefix (an earlier turn of the same
chat, a shared system prompt) is taken from the pool instead of computed. When a running request needs a block and
none is left, the newest request is preempted: its blocks go back (the full ones stay cached by prefix) and it
waits at the head of the queue to be prefilled again from its prompt and the tokens it had generated, so it resumes
where it was, usually from its own cached blocks.

Torch releases the GIL while it computes, so the web server's event loop stays responsive while this thread works;
the two sides meet only in `submit` (a locked queue) and each request's `emit` callback.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..generate import (DecodeStep, SamplingParams, TextStream, TokenLogprob, adjust_logits, make_generator, sample,
                        token_logprobs)
from ..model import Transformer
from .metrics import ServeMetrics
from .paged import BlockPool, paged_batch

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
    logprobs: list[TokenLogprob] | None = None  # the step's token, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output: the prompt's (the first one's is None)


class Request:
    """One completion: a tokenized prompt, how to sample it, and where its outputs go.

    `emit` is called from the engine thread with every `Output`; it must not block. `constraint` (a
    llama3.constrain.Constraint) masks the logits to what its grammar allows; `logprobs` (0-20) asks for each
    generated token's log-probability and that many alternatives, `prompt_logprobs` for the prompt's tokens too
    (then max_tokens may be 0: score the prompt, generate nothing).
    """

    def __init__(self, prompt: list[int], *, max_tokens: int, emit: Callable[[Output], None],
                 params: SamplingParams | None = None, stop: Iterable[str] = (), ignore_eos: bool = False,
                 constraint=None, logprobs: int | None = None, prompt_logprobs: bool = False):
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if max_tokens < (0 if prompt_logprobs else 1):
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.emit = emit
        self.params = params or SamplingParams()
        self.stop = list(stop)
        self.ignore_eos = ignore_eos
        self.constraint = constraint
        self.logprobs = logprobs
        # The prompt's first token has nothing before it: no logprob.
        self.prompt_logprobs = [TokenLogprob(self.prompt[0], None, [])] if prompt_logprobs else None
        self.step_logprob: TokenLogprob | None = None
        self.cancelled = False  # set by any thread, read by the engine thread
        # Engine-side state.
        self.tokens = list(prompt)  # the prompt and every token generated so far
        self.blocks: list[int] = []  # block table: position p lives in blocks[p // block_size]
        self.cached = 0  # positions 0..cached-1 hold keys/values
        self.shared = 0  # leading blocks registered in (or taken from) the prefix cache
        self.digest = b""  # the prefix digest of the last of those blocks
        self.completion_tokens = 0
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.finished = False

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the engine frees the request's slot at its next step."""
        self.cancelled = True


class Engine:
    def __init__(self, model: Transformer, tokenizer, *, max_batch: int = 64, max_context: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256, kv_cache_tokens: int | None = None,
                 block_size: int = 16, prefix_caching: bool = True, metrics: ServeMetrics | None = None,
                 decode_step: DecodeStep | None = None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or (max_context is not None and max_context < 2):
            raise ValueError(f"need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1 and max_context >= 2; got "
                             f"{max_batch}, {max_queue}, {prefill_chunk} and {max_context}")
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
        kv_cache_tokens = kv_cache_tokens or 4 * self.max_context
        if kv_cache_tokens < self.max_context:
            raise ValueError(f"the KV cache ({kv_cache_tokens} tokens) must hold at least one full context "
                             f"({self.max_context} tokens)")
        self.pool = BlockPool(model.args, -(-kv_cache_tokens // block_size) + 1, block_size, dtype=weight.dtype,
                              device=self.device, prefix_caching=prefix_caching)
        # How a decoding step runs (prefills stay eager): a compiled DecodeStep turns ~30 layers of Python per token
        # into one call. Its graph serves every batch size, block-table width and, reused by a later engine, pool.
        self.decode_step = decode_step  # None: the model's plain forward
        if decode_step is not None and decode_step.compile:
            for t in (self.pool.k, self.pool.v):
                torch._dynamo.mark_dynamic(t, 1)
        self._waiting: deque[Request] = deque()  # guarded by _cond
        self._cond = threading.Condition()
        self._running: list[Request] = []  # engine thread only, oldest first
        self._prefilling: list[Request] = []  # engine thread only: one long prompt or a group of short ones
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the engine thread itself died

    # ---- the caller's side (any thread) ----------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="llama3-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for req in [*self._waiting, *self._running, *self._prefilling]:
            self._fail(req, "the server is shutting down")
        self._waiting.clear()

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
        return len(self._waiting) + len(self._prefilling)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def _free_slots(self) -> int:
        return self.max_batch - len(self._running) - len(self._prefilling)

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
                    for req in [*self._running, *self._prefilling]:
                        self._fail(req, f"generation failed: {type(e).__name__}: {e}")
        except BaseException as e:
            self.error = e
            raise

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, decode one token for every running request, spend one step's prefill budget."""
        self._drop_cancelled()
        if self._running:
            self._decode()
        if not self._prefilling:
            self._prefilling = self._admit()
        if self._prefilling:
            self._prefill(self._prefilling)

    def _admit(self) -> list[Request]:
        """The next prompts to prefill, first come first served, each with blocks for its whole prompt: one long
        prompt alone (chunked over steps), or as many whole short prompts as there are free slots and fit in
        prefill_chunk tokens once padded. A prompt the pool cannot hold yet waits for running requests to end."""
        group, longest, pool = [], 0, self.pool
        with self._cond:
            while self._waiting and len(group) < self.max_batch - len(self._running):
                req = self._waiting[0]
                if req.cancelled:
                    self._waiting.popleft()
                    continue
                # A prompt to score is computed in full: cached blocks would skip its positions' logits.
                cached = pool.lookup(req.tokens) if req.prompt_logprobs is None else []
                n = len(req.tokens) - len(cached) * pool.block_size  # tokens to compute
                needed = pool.blocks_for(len(req.tokens)) - len(cached)
                too_long = group and (n > self.prefill_chunk or (len(group) + 1) * max(longest, n) > self.prefill_chunk)
                if too_long or needed > pool.num_available:
                    pool.release(cached)  # it goes first next step (or once memory is free)
                    break
                self._waiting.popleft()
                req.blocks = cached + [pool.allocate() for _ in range(needed)]
                req.shared, req.cached = len(cached), len(cached) * pool.block_size
                req.digest = pool.digest_of[cached[-1]] if cached else b""
                self.metrics.prefix_cache_queries.inc(len(req.tokens))
                self.metrics.prefix_cache_hits.inc(req.cached)
                group.append(req)
                longest = max(longest, n)
                if n > self.prefill_chunk:
                    break
        for req in group:
            if req.stream is None:  # not a preempted request coming back
                req.stream = TextStream(self.tokenizer, req.stop)
                req.generator = make_generator(req.params.seed, self.device)
        return group

    def _drop_cancelled(self) -> None:
        for req in [r for r in [*self._running, *self._prefilling] if r.cancelled]:
            self._free(req)
        with self._cond:
            if any(r.cancelled for r in self._waiting):
                self._waiting = deque(r for r in self._waiting if not r.cancelled)

    def _decode(self) -> None:
        running, pool = self._running, self.pool
        i = 0
        while i < len(running):  # each request needs a block for the position it writes; preempt until all have one
            req = running[i]
            if req.cached == len(req.blocks) * pool.block_size:
                block = pool.allocate()
                if block is None:
                    self._preempt(self._prefilling[-1] if self._prefilling else running[-1])
                    continue
                req.blocks.append(block)
            i += 1
        if not running:
            return
        tokens, positions = [[r.last_token] for r in running], [[r.cached] for r in running]  # (B, 1) each
        tables, slots = [r.blocks for r in running], positions
        compiled = self.decode_step is not None and self.decode_step.compile
        if compiled and len(running) == 1:
            # torch compiles a batch of one apart from larger ones: a scratch row keeps one graph for all
            tokens, positions, tables, slots = tokens + [[0]], positions + [[0]], tables + [[]], slots + [[-1]]
        batch = paged_batch(pool, tables, slots)
        tokens, positions = torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device)
        kv_len = max(r.cached for r in running) + 1
        if self.decode_step is None:
            logits = self.model(tokens, positions, batch)
        else:
            if compiled:
                for t in (batch.tables, batch.slots):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(batch.tables, 1)
                # whole blocks (the mask hides the rest): a graph traced at a kv_len inside a block would not
                # serve one at a block's end, where reading the blocks needs no cut
                kv_len = pool.blocks_for(kv_len) * pool.block_size
            logits = self.decode_step(tokens, positions, batch, kv_len=kv_len, dynamic_batch=True)
        logits = logits[:len(running), -1]  # (B, vocab)
        self.metrics.batch_size.observe(len(running))
        next_ids = self._sample(logits, running)
        for req, token in zip(list(running), next_ids):
            req.cached += 1
            self._share_full_blocks(req)
            if self._accept(req, token):
                self._free(req)

    def _prefill(self, group: list[Request]) -> None:
        """One forward pass over the next chunk of each prompt in the group (right-padded to the longest); once the
        prompts are complete, they sample their first token and start decoding."""
        chunks = [r.tokens[r.cached:r.cached + self.prefill_chunk] for r in group]
        T = max(map(len, chunks))
        # Pads repeat a row's last position, so they widen nothing, and write their keys/values to scratch.
        positions = [[r.cached + min(t, len(c) - 1) for t in range(T)] for r, c in zip(group, chunks)]
        slots = [[p if t < len(c) else -1 for t, p in enumerate(row)] for row, c in zip(positions, chunks)]
        tokens = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=self.device)  # (k, T)
        last = torch.tensor([len(c) - 1 for c in chunks], device=self.device)
        batch = paged_batch(self.pool, [r.blocks for r in group], slots)
        scoring = any(r.prompt_logprobs is not None for r in group)  # every position's logits, not just the last
        logits = self.model(tokens, torch.tensor(positions, device=self.device), batch,
                            logits_index=None if scoring else last)  # (k, T or 1, vocab)
        if scoring:
            for i, (req, c) in enumerate(zip(group, chunks)):
                targets = req.prompt[req.cached + 1:req.cached + len(c) + 1]  # each position predicts the next one
                if req.prompt_logprobs is not None and targets:
                    scores = torch.log_softmax(logits[i, :len(targets)].float(), dim=-1)
                    req.prompt_logprobs += token_logprobs(scores, targets, req.logprobs or 0)
            logits = logits[torch.arange(len(group)), last][:, None]
        logits = logits[:, -1]  # (k, vocab)
        for req, c in zip(group, chunks):
            req.cached += len(c)
            self._share_full_blocks(req)
        if group[0].cached < len(group[0].tokens):
            return  # a long prompt: more chunks next step
        self._prefilling = []
        for req in group:
            if req.completion_tokens == 0:
                self.metrics.prompt_tokens.inc(len(req.prompt))
        self._running.extend(group)
        for req, token in zip(group, self._sample(logits, group)):
            if self._accept(req, token):
                self._free(req)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """The one place a batch's logits (B, vocab) become tokens: each request's penalties and grammar mask, then
        its greedy or seeded choice; requests that asked for logprobs get the chosen token's under the model's own
        distribution (before penalties and masks, as OpenAI reports them)."""
        adjusted = logits
        for i, req in enumerate(requests):
            row = logits[i]
            new = adjust_logits(row, req.params, req.stream.ids, req.constraint)
            if new is not row:
                adjusted = logits.clone() if adjusted is logits else adjusted
                adjusted[i] = new
        ids = adjusted.argmax(dim=-1).tolist()  # greedy rows in one go; sampled rows one by one with their settings
        for i, req in enumerate(requests):
            if req.params.temperature > 0:
                ids[i] = int(sample(adjusted[i:i + 1], req.params, req.generator)[0])
            if req.logprobs is not None:
                scores = torch.log_softmax(logits[i:i + 1].float(), dim=-1)
                req.step_logprob = token_logprobs(scores, [ids[i]], req.logprobs)[0]
        return ids

    def _accept(self, req: Request, token: int) -> bool:
        """Take one sampled token: emit its text, and finish the request when it is done. True when finished."""
        if req.max_tokens == 0:  # only the prompt's logprobs were wanted
            return self._finish(req, "", "length")
        req.completion_tokens += 1
        req.tokens.append(token)
        self.metrics.generation_tokens.inc()
        if token in self.stop_ids and not req.ignore_eos:  # end of turn: not part of the text
            return self._finish(req, req.stream.finish(), "stop")
        if req.constraint is not None:
            try:
                req.constraint.accept(token)
            except ValueError as e:  # the grammar engine failed this request: the others go on
                self._fail(req, f"constrained decoding failed: {e}")
                return True
        logprobs = None if req.step_logprob is None else [req.step_logprob]
        text = req.stream.push(token)
        if req.stream.stopped:
            return self._finish(req, text, "stop", logprobs)
        if req.completion_tokens >= req.max_tokens:
            return self._finish(req, text + req.stream.finish(), "length", logprobs)
        self._emit(req, Output(text, logprobs=logprobs))
        return False

    def _finish(self, req: Request, text: str, reason: str, logprobs: list[TokenLogprob] | None = None) -> bool:
        req.finished = True
        self._emit(req, Output(text, reason, len(req.prompt), req.completion_tokens, logprobs=logprobs))
        return True

    def _fail(self, req: Request, message: str) -> None:
        self._free(req)
        if not req.finished:
            req.finished = True
            self._emit(req, Output("", "error", len(req.prompt), req.completion_tokens, error=message))

    def _emit(self, req: Request, out: Output) -> None:
        if req.prompt_logprobs is not None:  # sent once, with the first output
            out.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None
        try:
            req.emit(out)
        except Exception:  # the listener is gone (e.g. its event loop closed): stop working for it
            log.debug("dropping output of a request whose listener failed", exc_info=True)
            req.cancelled = True

    def _share_full_blocks(self, req: Request) -> None:
        """Key the request's newly filled blocks by their prefix, so later prompts can share them."""
        bs = self.pool.block_size
        for i in range(req.shared, req.cached // bs):
            req.digest = self.pool.digests(req.tokens[i * bs:(i + 1) * bs], req.digest)[0]
            self.pool.register(req.blocks[i], req.digest)
        req.shared = max(req.shared, req.cached // bs)

    def _free(self, req: Request) -> None:
        """Take the request out of the batch and give its blocks back."""
        for lst in (self._running, self._prefilling):
            if req in lst:
                lst.remove(req)
        self.pool.release(req.blocks)
        req.blocks, req.cached, req.shared, req.digest = [], 0, 0, b""

    def _preempt(self, req: Request) -> None:
        """Out of blocks: free this request's and queue it first, to be prefilled again (recomputed) later."""
        self._free(req)
        if req.prompt_logprobs is not None:  # scored again from the start, as it is computed again
            req.prompt_logprobs = req.prompt_logprobs[:1]
        self.metrics.preemptions.inc()
        with self._cond:
            self._waiting.appendleft(req)
