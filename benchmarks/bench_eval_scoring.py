"""Multiple-choice scoring speed: our Scorer against simpler ways to get the same log-likelihoods.

  ours     rows deduplicated, the shared k-shot prefix run once into the KV cache, logits only where scored
  batched  the same rows run whole through model(tokens) (batching, no prefix sharing)
  naive    one request at a time, whole sequence, full log-softmax (a plain loop)

On the bundled MMLU sample (5-shot). Prints seconds, ratios, and the largest difference in log-likelihood.

    python benchmarks/bench_eval_scoring.py [--model smollm2-135m-instruct] [--items 12] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from llama3.eval import readers
from llama3.eval.multiple_choice import FORMATS, build_requests, choose_shots
from llama3.eval.scoring import Scorer
from llama3.eval.tasks import SAMPLES_DIR
from llama3.llama import load


def naive(model, requests) -> list[float]:
    out = []
    with torch.inference_mode():
        for r in requests:
            tokens = torch.tensor([r.context + r.continuation])
            logprobs = torch.log_softmax(model(tokens)[0], dim=-1)
            start = len(r.context) - 1
            out.append(sum(float(logprobs[start + j, t]) for j, t in enumerate(r.continuation)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    llama = load(args.model)
    items = readers.read_mmlu(SAMPLES_DIR / "mmlu", "eval")[: args.items]
    dev = readers.read_mmlu(SAMPLES_DIR / "mmlu", "fewshot")
    shots_for = choose_shots(items, dev, 5, seed=1234, by_subject=True)
    requests = [r for rs in build_requests(llama, items, FORMATS["mmlu"], shots_for, chat=False) for r in rs]
    tokens = sum(len(r.context) + len(r.continuation) for r in requests)
    print(f"{args.model}: {len(items)} MMLU items, {len(requests)} requests, {tokens} tokens if run whole")

    vocab = llama.args.vocab_size
    runs = {
        "ours": lambda: [s.logprob for s in Scorer(llama.model, vocab_size=vocab, batch_size=args.batch_size).loglikelihood(requests)],
        "batched": lambda: [s.logprob for s in Scorer(lambda t: llama.model(t), vocab_size=vocab,
                                                     batch_size=args.batch_size).loglikelihood(requests)],
        "naive": lambda: naive(llama.model, requests),
    }
    runs["ours"]()  # warm up
    seconds, values = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        values[name] = run()
        seconds[name] = time.perf_counter() - start
    for name in runs:
        diff = max(abs(a - b) for a, b in zip(values[name], values["naive"]))
        print(f"{name:>8}: {seconds[name]:7.2f} s   {seconds[name] / seconds['ours']:5.2f}x ours   "
              f"max |logprob - naive| = {diff:.2e}")


if __name__ == "__main__":
    main()
