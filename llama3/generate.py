"""Autoregressive generation: sampling, batched prompts of different lengths over a static KV cache, and streaming
text that never splits a multi-byte character or shows part of a stop string."""

from __future__ import annotations

import math
import time
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import KVCache, Transformer


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (before temperature)
    frequency_penalty: float = 0.0  # OpenAI's: logit -= count * frequency_penalty for tokens generated so far
    presence_penalty: float = 0.0  # OpenAI's: logit -= presence_penalty for tokens generated at least once
    repeat_penalty: float = 1.0  # llama.cpp's: the last REPEAT_LAST_N generated tokens' logits divided (if > 0) or
    # multiplied (if < 0) by it

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")

    @property
    def penalizes(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repeat_penalty != 1)


REPEAT_LAST_N = 64  # llama.cpp's default window for repeat_penalty


def adjust_logits(logits: Tensor, params: SamplingParams, generated: list[int], constraint=None) -> Tensor:
    """One row of logits (V,) -> the logits sampling sees: repetition penalties over the tokens generated so far,
    then the constraint's grammar mask (llama3/constrain.py). Returns a new tensor when it changes anything."""
    out = logits
    if params.penalizes and generated:
        out = logits.float().clone()
        ids, counts = torch.tensor(generated, device=out.device).unique(return_counts=True)
        out[ids] -= counts.to(out.dtype) * params.frequency_penalty + params.presence_penalty
        if params.repeat_penalty != 1:
            recent = torch.tensor(generated[-REPEAT_LAST_N:], device=out.device).unique()
            values = out[recent]
            out[recent] = torch.where(values > 0, values / params.repeat_penalty, values * params.repeat_penalty)
    if constraint is not None and constraint.active:
        if out is logits:
            out = logits.float().clone()
        constraint.mask_(out)
    return out


@dataclass
class TokenLogprob:
    """A generated (or prompt) token's log-probability under the model, and the most likely alternatives."""

    token: int
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: list[tuple[int, float]]  # (token, logprob), most likely first


def token_logprobs(logprobs: Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """logprobs (T, V) (a log_softmax) and the token chosen at each row -> one TokenLogprob per row."""
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    best = logprobs.topk(top, dim=-1) if top else None
    return [TokenLogprob(t, lp, list(zip(best.indices[i].tolist(), best.values[i].tolist())) if top else [])
            for i, (t, lp) in enumerate(zip(tokens, chosen))]


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, params), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits (B, V) -> the distribution sampling draws from: temperature, then top-k, then top-p (temperature > 0)."""
    logits = logits.float()
    if params.min_p:  # p < min_p * p_max  <=>  logit < max logit + log(min_p)
        floor = logits.max(dim=-1, keepdim=True).values + math.log(params.min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already cover top_p; the most likely one always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def cache_dtype(model: Transformer, compiled: bool = False) -> torch.dtype:
    """The KV cache's dtype: the model's, except fp32 for eager steps on CPU, where attention runs in fp32 (torch's
    bf16 attention kernel is ~9x slower) and a bf16 cache would be widened at every step. A compiled step reads a
    bf16 cache as it is (see attention.attention_by_reduction): half the bytes per token, the same values (a bf16
    model's keys and values are bf16 already)."""
    weight = model.norm.weight
    return torch.float32 if weight.device.type == "cpu" and not compiled else weight.dtype


def check_prompt_lengths(prompts: list[list[int]], context: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ValueError(f"the prompt has {longest} tokens but the model's context is {context} tokens; "
                         f"shorten it to at most {context - 1}")


class DecodeStep:
    """One decoding step over a static KV cache: tokens (B, T) at positions (B, T) -> logits (B, T, vocab), where
    T is 1 in plain decoding and k + 1 when speculative decoding checks k drafted tokens.

    The caller says how many cache positions the step attends to (kv_len, known on the host: no device sync per
    token). With compile=True the step runs through torch.compile: one graph for every kv_len (that dimension is
    marked dynamic), the cache updated in place, the per-token Python of ~30 layers reduced to one call. Compiling
    takes tens of seconds once per process (less with a warm inductor cache); `compile_seconds` records it.

    cuda_graphs=True (for GPUs, where a small model's step is bound by kernel launches) compiles with CUDA graphs
    instead: every step attends to the whole cache so shapes never change, and the cache tensors are marked as
    static addresses, which lets a replayed graph update them in place. A new cache size records a new graph.
    """

    def __init__(self, model: Transformer, *, compile: bool = False, cuda_graphs: bool = False):
        self.model = model
        self.compile = compile or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self.compile_seconds: float | None = None  # set by the first call (torch.compile is lazy anyway)
        self._fn = _decode
        self._seen_cache: KVCache | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the KV caches this step should be given."""
        return cache_dtype(self.model, compiled=self.compile)

    def __call__(self, tokens: Tensor, positions: Tensor, cache: KVCache, kv_len: int, *,
                 dynamic_batch: bool = False) -> Tensor:
        """`cache` is a KVCache or anything with its `update` (a serving engine's paged batch). dynamic_batch: the
        batch size changes from call to call (continuous batching): one graph serves them all, where it compiles."""
        if self.cuda_graphs:
            kv_len = cache.max_seq_len
        mask = torch.arange(kv_len, device=tokens.device) <= positions[:, None, :, None]  # (B, 1, T, kv_len)
        if not self.compile:
            return _decode(self.model, tokens, positions, cache, mask)
        if not self.cuda_graphs:
            torch._dynamo.mark_dynamic(mask, 3)
        if dynamic_batch:  # "maybe": a batch of one is still compiled on its own (torch specializes size 1)
            for t in (tokens, positions, mask):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if isinstance(cache, KVCache) and cache is not self._seen_cache:  # each generation sizes its own cache
            for t in (cache.k, cache.v):
                if self.cuda_graphs:
                    torch._dynamo.mark_static_address(t)
                else:  # one graph for all cache sizes: (n_layers, max_batch, max_seq_len, ...)
                    torch._dynamo.mark_dynamic(t, 2)
            self._seen_cache = cache
        if self.compile_seconds is not None:
            return self._fn(self.model, tokens, positions, cache, mask)
        start = time.perf_counter()  # the first call: importing the compiler and compiling
        self._fn = self._compiled()
        logits = self._fn(self.model, tokens, positions, cache, mask)
        self.compile_seconds = time.perf_counter() - start
        return logits

    def _compiled(self):
        # No guards on the model's modules: checking them costs ~2 ms per step for a 30-layer model, about as much
        # as the attention. The price: the step is compiled for the model as it is at the first call; after
        # swapping its modules or changing its dtype, make a new DecodeStep. torch.compile caches graphs per code
        # object, so each step compiles a copy of its own: a graph made for another model is never picked up.
        fn = types.FunctionType(_decode.__code__.replace(), _decode.__globals__, "decode_step")
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        return torch.compile(fn, fullgraph=True, mode="reduce-overhead" if self.cuda_graphs else None,
                             options=options)


def _decode(model: Transformer, tokens: Tensor, positions: Tensor, cache: KVCache, mask: Tensor) -> Tensor:
    return model(tokens, positions, cache, attn_mask=mask)


@torch.inference_mode()
def generate_tokens(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int,
                    params: SamplingParams = SamplingParams(), stop_ids: Iterable[int] = (),
                    max_seq_len: int | None = None, step: DecodeStep | None = None,
                    constraints: list | None = None) -> Iterator[list[int | None]]:
    """Yield one step at a time: the new token of each prompt, or None once that prompt has stopped.
    `step` runs the decoding steps (default: an uncompiled DecodeStep); `constraints` holds each prompt's grammar
    (llama3/constrain.py Constraint, or None for a free row).

    Prompts are right-padded into one batch; each row keeps its own positions, so a row's result is the same as
    running it alone. Pad slots in the cache lie past the row's position and are overwritten before they are seen.
    """
    context = max_seq_len or model.args.max_seq_len
    check_prompt_lengths(prompts, context)
    device = model.norm.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lengths.max())
    max_new_tokens = min(max_new_tokens, context - T)
    if max_new_tokens <= 0:
        return
    B = len(prompts)
    step = step or DecodeStep(model)
    cache = KVCache(model.args, B, T + max_new_tokens, dtype=step.cache_dtype, device=device)
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    logits = model(tokens, cache=cache, logits_index=lengths - 1)[:, -1]  # positions 0..T-1: plain causal
    generator = make_generator(params.seed, device)
    stop = set(stop_ids)
    done = [False] * B
    for i in range(max_new_tokens):
        for row, constraint in enumerate(constraints or ()):
            if constraint is not None and not done[row]:
                logits[row] = adjust_logits(logits[row], params, [], constraint)
        next_tokens = sample(logits, params, generator)
        ids = next_tokens.tolist()
        yield [None if d else t for d, t in zip(done, ids)]
        for row, constraint in enumerate(constraints or ()):
            if constraint is not None and not done[row] and ids[row] not in stop:
                constraint.accept(ids[row])
        done = [d or t in stop for d, t in zip(done, ids)]
        if all(done) or i == max_new_tokens - 1:
            return
        # The new token of step i sits at position len + i; the longest row needs T + i + 1 cache positions.
        logits = step(next_tokens[:, None], (lengths + i)[:, None], cache, kv_len=T + i + 1)[:, -1]


class TextStream:
    """Turns generated ids into text increments. Holds back an incomplete UTF-8 character and any tail that could
    be the start of a stop string; cuts the text at the first stop string."""

    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            i = self.text.find(s)
            if i >= 0:
                self.text, self.stopped = self.text[:i], True
        if self.stopped:
            return self._emit(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))
        # Keep back the longest tail that could still grow into a stop string.
        hold = max((k for s in self.stop for k in range(1, min(len(s) - 1, safe) + 1)
                    if self.text[safe - k:safe] == s[:k]), default=0)
        return self._emit(safe - hold)

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta
