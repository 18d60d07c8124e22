"""Log-likelihood of continuations given contexts: the engine under multiple choice and perplexity.

Speed comes from three things:
  * requests that share their context and all but the last continuation token are one forward row (the
    letter answers " A"/" B"/" C"/" D" of an MMLU question cost one row, not four);
  * rows are sorted by their tokens, so a batch holds rows with a long common prefix (the k-shot examples),
    which runs once into the KV cache and is copied to every row;
  * logits are computed only where a continuation token is scored: context tokens fill the cache with a
    single-position output, so the vocabulary projection never runs over the whole prompt.
Without a KV cache (any `model(tokens) -> logits` callable) the rows run whole and only batching remains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llama3.model import KVCache


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # at least one token
    continuation: tuple[int, ...]  # at least one token


@dataclass
class _RowScore:
    prefix_logprob: float  # log-likelihood of the continuation tokens before the last
    prefix_greedy: bool
    last_logprobs: Tensor  # (V,) log-probabilities of the last continuation token


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(continuation token | everything before it)
    is_greedy: bool  # every continuation token is the argmax


def uses_bos(tokenizer) -> bool:
    """Whether prompts start with BOS (Llama 3 does; some GGUF vocabularies say not to)."""
    return bool(getattr(tokenizer, "add_bos", True)) and getattr(tokenizer, "bos_id", None) is not None


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Tokenize a (context, continuation) pair the way lm-eval does: trailing spaces of the context move to the
    continuation, and the pair is encoded whole and then split, so the boundary merges as in running text."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    bos = uses_bos(tokenizer)
    context_ids = tokenizer.encode(stripped, bos=bos)
    whole = tokenizer.encode(stripped + continuation, bos=bos)
    if not context_ids:  # empty context without BOS: the first token of the text becomes the context
        context_ids, whole = whole[:1], whole
    return Request(tuple(context_ids), tuple(whole[len(context_ids):]))


def _row_key(request: Request) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return request.context, request.continuation[:-1]


class Scorer:
    """Scores Requests with a causal LM: `model(tokens, positions, cache, logits_index=...) -> logits`, as
    llama3.model.Transformer is. A model without `args` (so no KV cache) is called as `model(tokens)`."""

    def __init__(self, model: Callable[..., Tensor], *, vocab_size: int, batch_size: int = 8,
                 max_seq_len: int | None = None, logits_budget: int = 1 << 27):
        self.model = model
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.logits_budget = logits_budget  # floats of logits per forward pass (128M = 512 MiB)
        args = getattr(model, "args", None)
        self.use_cache = args is not None
        self.max_seq_len = max_seq_len or (args.max_seq_len if args is not None else 2048)
        self.device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[Score]:
        """One Score per request, in order. progress(n) is called as n more requests are done."""
        for r in requests:
            if not r.context or not r.continuation:
                raise ValueError("a log-likelihood request needs a non-empty context and continuation")
        fitted = [self._fit(r) for r in requests]
        rows: dict[tuple, list[int]] = {}  # row key -> indices of the requests it answers
        for i, r in enumerate(fitted):
            rows.setdefault(_row_key(r), []).append(i)
        keys = sorted(rows, key=lambda k: k[0] + k[1])  # neighbours share the longest prefixes
        scores: list[Score | None] = [None] * len(requests)
        for batch in self._batches(keys):
            done = 0
            for key, row in zip(batch, self._score_rows(batch)):
                for i in rows[key]:
                    last = fitted[i].continuation[-1]
                    greedy = row.prefix_greedy and int(row.last_logprobs.argmax()) == last
                    scores[i] = Score(row.prefix_logprob + float(row.last_logprobs[last]), greedy)
                    done += 1
            if progress is not None:
                progress(done)
        return scores  # type: ignore[return-value]

    def _batches(self, keys: list[tuple]) -> list[list[tuple]]:
        """Up to batch_size rows, and few enough scored positions that the logits stay within the budget. A
        batch also ends where the next row would cut the prefix its rows share to less than half (the k-shot
        examples of the next MMLU subject start a new batch rather than losing this one's shared prefix)."""
        budget = max(1, self.logits_budget // self.vocab_size)
        batches, batch, positions, shared = [], [], 0, 0
        for key in keys:
            width = len(key[1]) + 1
            common = _common_prefix_length([batch[0][0], key[0]]) if batch else 0
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * max(positions, width) > budget
                          or (len(batch) > 1 and common < shared // 2)):
                batches.append(batch)
                batch, positions = [], 0
            shared = common if len(batch) == 1 else min(shared, common) if batch else 0
            batch.append(key)
            positions = max(positions, width)
        return batches + [batch] if batch else batches

    def _fit(self, r: Request) -> Request:
        """Cut the context from the left so context + continuation fits the model (as lm-eval does)."""
        excess = len(r.context) + len(r.continuation) - self.max_seq_len
        if excess <= 0:
            return r
        if len(r.continuation) >= self.max_seq_len:
            raise ValueError(f"a continuation of {len(r.continuation)} tokens does not fit the context of {self.max_seq_len}")
        return Request(r.context[excess:], r.continuation)

    def _score_rows(self, keys: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[_RowScore]:
        """Score rows (context, continuation[:-1]): the logits at the positions that predict the continuation."""
        logits, lengths = self._row_logits(keys) if self.use_cache else self._row_logits_whole(keys)
        out = []
        for i, (_, head) in enumerate(keys):
            row = logits[i, : lengths[i]]  # (len(head) + 1, V)
            logprobs_head = row[:-1].log_softmax(-1)
            target = torch.tensor(head, dtype=torch.long, device=row.device)
            picked = logprobs_head.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logprobs_head.argmax(-1) == target).all())
            out.append(_RowScore(float(picked.double().sum()), greedy, row[-1].log_softmax(-1)))
        return out

    def _row_logits(self, keys) -> tuple[Tensor, Tensor]:
        """Logits (B, T, V) at the last context token and the continuation tokens but the last, with the context
        run through the KV cache; and each row's number of such positions."""
        B = len(keys)
        contexts = [k[0] for k in keys]
        # the part every row shares, leaving each row at least its last context token
        shared = _common_prefix_length(contexts)
        shared = min(shared, min(len(c) for c in contexts) - 1)
        # pad slots run past a row's end: room for the longest context plus the widest scored span
        longest = max(len(c) for c in contexts) + max(len(t) + 1 for _, t in keys)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.args, B, longest, dtype=dtype, device=self.device)
        if shared > 0:
            prefix = torch.tensor([contexts[0][:shared]], device=self.device)
            self.model(prefix, cache=cache, logits_index=torch.tensor([shared - 1], device=self.device))
            cache.copy_rows(slice(1, B), cache, slice(0, 1), shared)
        # context between the shared prefix and its last token: into the cache, one logit per row
        middles = [c[shared:-1] for c in contexts]
        if any(middles):
            tokens, positions, lengths = self._pad(middles, [shared] * B)
            self.model(tokens, positions, cache, logits_index=(lengths - 1).clamp(min=0))
        # last context token + continuation[:-1]: these positions predict the continuation
        scored = [c[-1:] + t for c, t in keys]
        tokens, positions, lengths = self._pad(scored, [len(c) - 1 for c in contexts])
        return self.model(tokens, positions, cache), lengths

    def _row_logits_whole(self, keys) -> tuple[Tensor, Tensor]:
        """The same positions from whole rows through a cache-less model(tokens)."""
        tokens, _, _ = self._pad([c + t for c, t in keys], [0] * len(keys))
        logits = self.model(tokens)
        width = max(len(t) + 1 for _, t in keys)
        out = logits.new_zeros(len(keys), width, logits.shape[-1])
        for i, (c, t) in enumerate(keys):
            out[i, : len(t) + 1] = logits[i, len(c) - 1 : len(c) + len(t)]
        return out, torch.tensor([len(t) + 1 for _, t in keys])

    def _pad(self, sequences: list[tuple[int, ...]], starts: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-pad rows into (B, T) tokens with per-row absolute positions starting at starts[i]. Pad slots
        sit after a row's last real token, so no real token ever attends to them."""
        B, T = len(sequences), max(1, max(len(s) for s in sequences))
        tokens = torch.zeros(B, T, dtype=torch.long)
        for i, s in enumerate(sequences):
            tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        positions = torch.tensor(starts)[:, None] + torch.arange(T)[None, :]
        lengths = torch.tensor([len(s) for s in sequences])
        return tokens.to(self.device), positions.to(self.device), lengths.to(self.device)


def _common_prefix_length(sequences: list[tuple[int, ...]]) -> int:
    first, n = sequences[0], min(len(s) for s in sequences)
    for s in sequences[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def rolling_requests(tokens: Sequence[int], prefix: Sequence[int], window: int, stride: int | None = None) -> list[Request]:
    """Requests that together score every token of a long text once, each with up to `window` tokens of
    context before it: the text is cut into chunks of `stride` tokens (default: half the window), each scored
    with the tokens just before it as context. `prefix` (BOS, or nothing) conditions the first chunk; without it
    the first token of the text is context only."""
    stride = stride or max(1, window // 2)
    if not 0 < stride < window:
        raise ValueError(f"stride must be in (0, window), got stride={stride} window={window}")
    tokens = list(tokens)
    sequence = list(prefix) + tokens
    start = len(prefix) if prefix else 1
    requests = []
    while start < len(sequence):
        end = min(start + stride, len(sequence))
        context = sequence[max(0, end - window) : start]
        requests.append(Request(tuple(context), tuple(sequence[start:end])))
        start = end
    return requests
