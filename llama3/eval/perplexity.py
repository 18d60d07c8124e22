"""Perplexity and bits per byte on plain text files.

Each file is tokenized whole and scored with a sliding window (llama3.eval.scoring.rolling_requests): every
token once, each with up to `window` tokens of context. Bits per byte (-sum log2 p / UTF-8 bytes) compares
models with different tokenizers fairly; token perplexity does not.
"""

from __future__ import annotations

import math
from pathlib import Path

from llama3.eval.results import TaskResult
from llama3.eval.scoring import Scorer, rolling_requests, uses_bos


def text_metrics(logprob: float, n_bytes: int, n_words: int, n_tokens: int) -> dict[str, float]:
    bits_per_byte = -logprob / math.log(2) / n_bytes
    return {
        "bits_per_byte": bits_per_byte,
        "byte_perplexity": 2**bits_per_byte,
        "word_perplexity": math.exp(-logprob / n_words),
        "token_perplexity": math.exp(-logprob / n_tokens),
    }


def evaluate_perplexity(model, scorer: Scorer, files: list[Path], window: int, stride: int | None = None,
                        progress=None) -> TaskResult:
    tokenizer = model.tokenizer
    prefix = [tokenizer.bos_id] if uses_bos(tokenizer) else []
    window = min(window, scorer.max_seq_len)
    totals = {"logprob": 0.0, "bytes": 0, "words": 0, "tokens": 0}
    breakdown = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        tokens = tokenizer.encode(text)
        requests = rolling_requests(tokens, prefix, window, stride)
        logprob = sum(s.logprob for s in scorer.loglikelihood(requests, progress))
        n_tokens = sum(len(r.continuation) for r in requests)
        counts = {"bytes": len(text.encode()), "words": max(1, len(text.split())), "tokens": max(1, n_tokens)}
        breakdown[path.name] = text_metrics(logprob, counts["bytes"], counts["words"], counts["tokens"]) | {"n": 1}
        totals["logprob"] += logprob
        for key, value in counts.items():
            totals[key] += value
    metrics = text_metrics(totals["logprob"], totals["bytes"], totals["words"], totals["tokens"])
    return TaskResult("perplexity", metrics, len(files), 0, 0.0, breakdown if len(files) > 1 else {})
