"""Generative tasks with answer extraction: GSM-8K and MATH, by chain of thought.

The model writes a worked solution after k worked examples (greedy by default); the answer is pulled out of the
text (llama3.eval.extract) and compared with the reference after normalization: exact match.
  GSM-8K  "Question: ..\\nAnswer: <reasoning> The answer is N."          (the dataset's "#### N" line reworded)
  MATH    "Problem:\\n..\\n\\nSolution: <reasoning>\\nFinal Answer: The final answer is X. I hope it is correct."
With --chat the examples become user/assistant turns and the question carries an instruction on how to end.
"""

from __future__ import annotations

import random
import re
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from llama3.eval.extract import extract_gsm8k_answer, extract_math_answer, math_answers_match, normalize_number
from llama3.eval.readers import GenerativeItem
from llama3.eval.results import TaskResult, accuracy_metrics


@dataclass(frozen=True)
class GenerativeFormat:
    question: Callable[[GenerativeItem], str]  # the prompt for an item, up to where the model writes
    worked: Callable[[GenerativeItem], str]  # an item's worked solution, as a k-shot example continues it
    instruction: str  # appended to the question in chat mode
    stop: tuple[str, ...]  # where a completion ends in base mode
    is_correct: Callable[[str | None, GenerativeItem], bool]
    extract: Callable[[str], str | None]
    max_new_tokens: int


def _gsm8k_worked(item: GenerativeItem) -> str:
    reasoning, _, _ = item.solution.rpartition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # calculator annotations are not prose
    return f" {reasoning} The answer is {item.answer}."


def _math_worked(item: GenerativeItem) -> str:
    return f" {item.solution.strip()}\nFinal Answer: The final answer is ${item.answer}$. I hope it is correct."


FORMATS = {
    "gsm8k": GenerativeFormat(
        question=lambda item: f"Question: {item.question}\nAnswer:",
        worked=_gsm8k_worked,
        instruction="Solve the problem step by step, then end with 'The answer is N.' where N is the final number.",
        stop=("\n\nQuestion:", "\nQuestion:", "\n\n\n"),
        extract=extract_gsm8k_answer,
        is_correct=lambda prediction, item: prediction is not None and prediction == normalize_number(item.answer),
        max_new_tokens=256,
    ),
    "math": GenerativeFormat(
        question=lambda item: f"Problem:\n{item.question}\n\nSolution:",
        worked=_math_worked,
        instruction="Solve the problem step by step, then end with 'Final Answer: The final answer is X. "
        "I hope it is correct.' where X is the final answer in LaTeX.",
        stop=("\n\nProblem:", "\nProblem:", "I hope it is correct."),
        extract=extract_math_answer,
        is_correct=lambda prediction, item: math_answers_match(prediction, item.answer),
        max_new_tokens=512,
    ),
}


def fixed_shots(pool: list, shots: int, seed: int, avoid_self: bool):
    """One draw of k examples used for every item (so prompts share their prefix); an item drawn from the
    evaluated set itself is replaced by a spare."""
    drawn = random.Random(seed).sample(pool, min(len(pool), shots + int(avoid_self)))
    return lambda item: [e for e in drawn if e is not item][:shots]


def fit_prompt(ids: list[int], context: int, max_new_tokens: int) -> list[int]:
    """Cut a prompt from the left (the oldest k-shot text goes first) so that it leaves room to generate; at
    least half the context stays prompt, and generation stops at the context's end."""
    keep = max(context - max_new_tokens, context // 2)
    return ids[-keep:]


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt has in common with the first."""
    first, n = prompts[0], len(prompts[0])
    for p in prompts[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], p)) if a != b), min(n, len(p)))
    return n


def complete(model, prompts: list[list[int]], *, max_new_tokens: int, stop: Sequence[str] = (),
             temperature: float = 0.0, top_p: float = 1.0, seeds: Sequence[int | None] | None = None,
             max_batch: int = 16, progress: Callable[[int], None] | None = None, prefix_caching: bool = True,
             metrics=None) -> list[str]:
    """Every prompt's completion (a `Llama`'s model and tokenizer), from the engine that serves: continuous
    batching (a finished row takes the next prompt at the following step, so no row waits for the longest of
    a batch), the k-shot examples that the prompts share computed once (prefix caching), decoding steps through
    the model's `decode_step` (compiled when the model was loaded with compile=True), and each completion cut at
    the first of the stop strings. Greedy unless temperature > 0. `metrics` (a ServeMetrics) collects the
    engine's counters, the prefix cache's hits among them."""
    from llama3.generate import SamplingParams
    from llama3.serve.engine import Engine, Request

    if not prompts:
        return []
    # the KV cache holds the longest prompt and its completion, not the model's whole context
    context = min(model.args.max_seq_len, max(map(len, prompts)) + max_new_tokens)
    engine = Engine(model.model, model.tokenizer, max_batch=min(max_batch, len(prompts)), max_context=context,
                    max_queue=len(prompts), prefill_chunk=max(256, min(context, 2048)), prefix_caching=prefix_caching,
                    metrics=metrics, decode_step=getattr(model, "decode_step", None))
    pieces: list[list[str]] = [[] for _ in prompts]
    errors: list[str] = []
    finished = threading.Semaphore(0)
    first_output = threading.Event()

    def emitter(i: int):
        def emit(out) -> None:  # on the engine's thread
            pieces[i].append(out.text)
            if i == 0:
                first_output.set()
            if out.finish_reason is not None:
                if out.error:
                    errors.append(out.error)
                if progress is not None:
                    progress(1)
                finished.release()
        return emit

    requests = [Request(p, max_tokens=max_new_tokens, emit=emitter(i), stop=stop,
                        params=SamplingParams(temperature=temperature, top_p=top_p, seed=seeds[i] if seeds else None))
                for i, p in enumerate(prompts)]

    def wait(done: Callable[[], bool]) -> None:
        while not done():
            if not engine.alive:
                raise RuntimeError(f"the generation engine stopped: {engine.error!r}")

    engine.start()
    try:
        # Prompts admitted together are computed together, each its own copy of the k-shot examples: so the first
        # prompt goes alone, and the others, admitted once it has its first token, find those blocks cached.
        if prefix_caching and len(prompts) > 1 and shared_prefix(prompts) >= engine.pool.block_size:
            engine.submit(requests[:1])
            wait(lambda: first_output.wait(timeout=1.0))
            engine.submit(requests[1:])
        else:
            engine.submit(requests)
        for _ in requests:
            wait(lambda: finished.acquire(timeout=1.0))
    finally:
        engine.stop()
    if errors:
        raise RuntimeError(errors[0])
    return ["".join(p) for p in pieces]


def prompt_ids(model, fmt, item, examples, chat: bool) -> list[int]:
    if chat:
        messages = []
        for ex in examples:
            messages += [{"role": "user", "content": f"{ex.question}\n{fmt.instruction}"},
                         {"role": "assistant", "content": fmt.worked(ex).strip()}]
        messages.append({"role": "user", "content": f"{item.question}\n{fmt.instruction}"})
        return model.encode_chat(messages)
    text = "".join(fmt.question(ex) + fmt.worked(ex) + "\n\n" for ex in examples) + fmt.question(item)
    return model.encode_prompt(text)


def evaluate_generative(model, task: str, items: list[GenerativeItem], pool: list[GenerativeItem],
                        fmt: GenerativeFormat, shots: int, chat: bool, batch_size: int,
                        max_new_tokens: int | None = None, seed: int = 1234, progress=None) -> TaskResult:
    shots_for = fixed_shots(pool or items, shots, seed, avoid_self=not pool)
    max_new_tokens = max_new_tokens or fmt.max_new_tokens
    prompts = [fit_prompt(prompt_ids(model, fmt, item, shots_for(item), chat), model.args.max_seq_len, max_new_tokens)
               for item in items]
    completions = complete(model, prompts, max_new_tokens=max_new_tokens, stop=() if chat else fmt.stop,
                           max_batch=batch_size, progress=progress)
    correct, samples = [], []
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for item, completion in zip(items, completions):
        prediction = fmt.extract(completion)
        ok = fmt.is_correct(prediction, item)
        correct.append(ok)
        if item.subject:
            by_subject[item.subject].append(ok)
        samples.append({"id": item.id, "target": item.answer, "prediction": prediction, "completion": completion,
                        "correct": ok})
    breakdown = {s: {"exact_match": sum(v) / len(v), "n": len(v)} for s, v in by_subject.items()}
    return TaskResult(task, accuracy_metrics(correct, "exact_match"), len(items), len(shots_for(items[0])) if items else 0,
                      0.0, breakdown, samples)
