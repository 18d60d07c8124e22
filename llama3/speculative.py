"""Speculative decoding: a cheap draft model proposes k tokens one by one, the target model checks all of them in a
single forward pass, and the output keeps the longest drafted prefix the target agrees with plus one token of the
target's own. Decoding a single sequence is bound by reading the weights, so the target's pass over k + 1 tokens
costs about as much as one plain step: every accepted draft token is nearly free.

Greedy decoding gives exactly the target's greedy output. Sampling uses the rejection rule of Leviathan et al.
(2023) / Chen et al. (2023): draft token x ~ q is kept with probability min(1, p(x) / q(x)), otherwise a token is
drawn from max(0, p - q) renormalised, which leaves the output distributed exactly as the target's p.

A good draft shares the target's tokenizer and is much cheaper per token: a smaller model of the family, or the
target itself quantized to 4 bits (self-speculation, which agrees with the target almost always).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from .generate import DecodeStep, SamplingParams, check_prompt_lengths, make_generator, sampling_probs
from .model import KVCache, Transformer


def accept_drafts(target_probs: Tensor, draft_probs: Tensor, drafted: list[int],
                  generator: torch.Generator | None = None) -> list[int]:
    """The rejection rule. target_probs (k + 1, V): the target's distribution at each drafted position and one
    past the last; draft_probs (k, V); drafted: the k tokens drawn from draft_probs. Returns the accepted drafted
    tokens followed by one token from the target (a correction, or a bonus token when all k were accepted)."""
    out = []
    for j, token in enumerate(drafted):
        p, q = target_probs[j, token], draft_probs[j, token]
        if torch.rand((), generator=generator, device=p.device) * q <= p:  # accept with probability min(1, p / q)
            out.append(token)
            continue
        residual = (target_probs[j] - draft_probs[j]).clamp(min=0)
        total = residual.sum()
        residual = residual / total if total > 0 else target_probs[j]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[len(drafted)], 1, generator=generator)))
    return out


def accept_greedy(target_logits: Tensor, drafted: list[int]) -> list[int]:
    """Greedy: drafted tokens are kept while they equal the target's argmax; then the target's own token."""
    best = target_logits.argmax(dim=-1).tolist()  # (k + 1,)
    out = []
    for j, token in enumerate(drafted):
        if token != best[j]:
            break
        out.append(token)
    out.append(best[len(out)])
    return out


class SpeculativeDecoder:
    """Generates one sequence with `target`, drafting `k` tokens at a time with `draft`.

    `proposed` and `accepted` count drafted tokens over the decoder's lifetime (acceptance rate = accepted / proposed).
    With compile=True both models' steps go through torch.compile (see DecodeStep).
    """

    def __init__(self, target: Transformer, draft: Transformer, k: int = 4, *, compile: bool = False):
        if k < 1:
            raise ValueError(f"k (tokens drafted per step) must be >= 1, got {k}")
        if draft.args.vocab_size != target.args.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.args.vocab_size} tokens) differs from the target's "
                             f"({target.args.vocab_size}); they must share a tokenizer")
        self.target, self.draft, self.k = target, draft, k
        self.target_step = DecodeStep(target, compile=compile)
        self.draft_step = DecodeStep(draft, compile=compile)
        self.proposed = self.accepted = 0

    @torch.inference_mode()
    def generate(self, prompt: list[int], *, max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 stop_ids: Iterable[int] = (), constraint=None) -> Iterator[int]:
        """Yield new tokens as they are settled (several per target pass); stops after a stop id. `constraint`
        (llama3/constrain.py) masks the draft's and the target's logits alike: the draft proposes only tokens the
        grammar allows, and each of the target's k + 1 positions is masked with the grammar's state after the drafts
        before it (the grammar rolls back what the target rejects), so the output is the constrained target's."""
        context = min(self.target.args.max_seq_len, self.draft.args.max_seq_len)
        check_prompt_lengths([prompt], context)
        max_new_tokens = min(max_new_tokens, context - len(prompt))
        if max_new_tokens <= 0:
            return
        device = self.target.norm.weight.device
        size = len(prompt) + max_new_tokens + self.k + 1  # a last round may draft past the end
        target_cache = KVCache(self.target.args, 1, size, dtype=self.target_step.cache_dtype, device=device)
        # A draft with the target's cache shape (e.g. the target quantized) shares its cache: it then never reads
        # the prompt itself and always sees the target's keys/values for settled tokens. The target stays exact:
        # each pass rewrites every position it attends to at or past its first input before reading it.
        shared = self.shares_cache()
        draft_cache = target_cache if shared else \
            KVCache(self.draft.args, 1, size, dtype=self.draft_step.cache_dtype, device=device)
        generator = make_generator(params.seed, device)
        greedy = params.temperature == 0
        stop = set(stop_ids)

        def run(step: DecodeStep, cache: KVCache, tokens: list[int], start: int) -> Tensor:
            """Feed tokens at positions start.. ; logits (len(tokens), V). Short inputs (the draft's 1-2 tokens,
            the target's k + 1) go through the step, so a compiled step sees only those few shapes."""
            ids = torch.tensor([tokens], device=device)
            positions = torch.arange(start, start + len(tokens), device=device)[None]
            if len(tokens) > self.k + 1:  # the draft's first call reads the whole prompt
                return step.model(ids, positions, cache)[0]
            return step(ids, positions, cache, kv_len=start + len(tokens))[0]

        def masked(logits: Tensor) -> Tensor:
            return logits if constraint is None else constraint.mask_(logits.float().clone())

        def advance(tokens: list[int]) -> int:
            """Move the grammar over tokens (up to a stop id); how many it took, for a rollback."""
            taken = 0
            for t in tokens:
                if constraint is None or t in stop:
                    break
                constraint.accept(t)
                taken += 1
            return taken

        def pick(logits: Tensor) -> tuple[int, Tensor | None]:
            logits = masked(logits)
            if greedy:
                return int(logits.argmax()), None
            probs = sampling_probs(logits[None], params)[0]
            return int(torch.multinomial(probs, 1, generator=generator)), probs

        # The prompt through the target gives the first token; a separate draft cache catches up on the first round.
        last = torch.tensor([len(prompt) - 1], device=device)
        first, _ = pick(self.target(torch.tensor([prompt], device=device), cache=target_cache, logits_index=last)[0, -1])
        advance([first])
        seq = list(prompt) + [first]
        target_len, draft_len = len(prompt), len(prompt) if shared else 0  # positions each cache holds
        emitted = 0
        while True:
            new = seq[len(prompt) + emitted:]
            for t in new:
                yield t
                emitted += 1
                if t in stop or emitted == max_new_tokens:
                    return
            # Draft k tokens; its first call also feeds whatever it has not seen yet.
            drafted, draft_probs = [], []
            logits = run(self.draft_step, draft_cache, seq[draft_len:], draft_len)[-1]
            drafts_taken = 0
            for j in range(self.k):
                token, probs = pick(logits)
                drafted.append(token)
                draft_probs.append(probs)
                drafts_taken += advance([token]) if drafts_taken == j else 0
                if j < self.k - 1:
                    logits = run(self.draft_step, draft_cache, [token], len(seq) + j)[-1]
            # The target scores its last token and all drafts in one pass: k + 1 positions.
            target_logits = run(self.target_step, target_cache, seq[target_len:] + drafted, target_len)
            if constraint is not None:  # position j is masked with the grammar after drafts 0..j-1
                constraint.rollback(drafts_taken)
                target_logits = target_logits.float().clone()
                taken = 0
                for j in range(self.k + 1):
                    if taken == j:
                        constraint.mask_(target_logits[j])
                        taken += advance(drafted[j:j + 1]) if j < self.k else 0
                constraint.rollback(taken)
            if greedy:
                settled = accept_greedy(target_logits, drafted)
            else:
                target_probs = sampling_probs(target_logits, params)
                settled = accept_drafts(target_probs, torch.stack(draft_probs), drafted, generator)
            m = len(settled) - 1  # drafted tokens accepted
            advance(settled)
            self.proposed += self.k
            self.accepted += m
            # Cache entries past the accepted tokens are stale; they sit at positions that get rewritten.
            target_len = len(seq) + m
            draft_len = target_len if shared else len(seq) + min(m, self.k - 1)
            seq += settled

    def shares_cache(self) -> bool:
        t, d = self.target, self.draft
        same_shape = (t.args.n_layers, t.args.n_kv_heads, t.args.head_dim) == \
            (d.args.n_layers, d.args.n_kv_heads, d.args.head_dim)
        # The shared cache keeps the target's dtype; the draft's attention reads any (it widens to fp32 or its own).
        return same_shape and t.norm.weight.device == d.norm.weight.device
