"""Multiple choice by log-likelihood: each choice is a continuation of the prompt, the most likely one is the
model's answer. `acc` takes the highest total log-likelihood; `acc_norm` divides it by the choice's length in
characters first, so long answers are not penalised for having more tokens (lm-eval's definitions).

Prompts (k-shot examples joined by blank lines, the same examples for every item so the prefix is shared):
  letter  (MMLU, CommonsenseQA, GPQA)  "Question\\nA. ..\\nB. ..\\nAnswer:" -> " A" / " B" / ...
  cloze   (ARC, HellaSwag, BoolQ)      "Question: ..\\nAnswer:" -> " <choice text>"
  partial (Winogrande)                 the sentence up to the blank with each option filled in -> the rest of it
With --chat every task is asked as a lettered question inside the chat template, and the assistant's reply
is scored as the bare letter.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from llama3.eval.readers import MultipleChoiceItem
from llama3.eval.results import TaskResult, accuracy_metrics
from llama3.eval.scoring import Request, Scorer, encode_pair

LETTERS = "ABCDEFGHIJ"


def lettered(question: str, choices: list[str]) -> str:
    return question.strip() + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(choices))


@dataclass(frozen=True)
class PromptFormat:
    """How one task's items become (context, continuation) pairs."""

    style: str  # "letter", "cloze" or "partial"
    query: Callable[[MultipleChoiceItem], str] = lambda item: f"Question: {item.question}\nAnswer:"
    header: Callable[[MultipleChoiceItem], str] = lambda item: ""  # text before the k-shot examples

    def pairs(self, item: MultipleChoiceItem) -> list[tuple[str, str]]:
        if self.style == "letter":
            query = lettered(item.question, item.choices) + "Answer:"
            return [(query, f" {LETTERS[i]}") for i in range(len(item.choices))]
        if self.style == "partial":
            blank = item.question.index("_")
            rest = " " + item.question[blank + 1 :].strip()
            return [(item.question[:blank] + option, rest) for option in item.choices]
        return [(self.query(item), " " + choice) for choice in item.choices]

    def demo(self, item: MultipleChoiceItem) -> str:
        """The item with its answer, as a k-shot example."""
        context, continuation = self.pairs(item)[item.answer]
        return context + continuation

    def chat_question(self, item: MultipleChoiceItem) -> str:
        if self.style == "partial":
            question = f"Which option fills the blank (_)?\n{item.question}"
        elif self.style == "letter":
            question = item.question
        else:
            question = self.query(item).removesuffix("Answer:").strip()
        return lettered(question, item.choices) + "Answer with the letter of the correct option."


def mmlu_header(item: MultipleChoiceItem) -> str:
    return f"The following are multiple choice questions (with answers) about {item.subject.replace('_', ' ')}.\n\n"


FORMATS = {
    "letter": PromptFormat("letter"),
    "mmlu": PromptFormat("letter", header=mmlu_header),
    "cloze": PromptFormat("cloze"),
    "hellaswag": PromptFormat("cloze", query=lambda item: item.question),
    "boolq": PromptFormat("cloze", query=lambda item: f"{item.passage}\nQuestion: {item.question}?\nAnswer:"),
    "partial": PromptFormat("partial"),
}


def choose_shots(items: list[MultipleChoiceItem], pool: list[MultipleChoiceItem], shots: int, seed: int,
                 by_subject: bool) -> Callable[[MultipleChoiceItem], list[MultipleChoiceItem]]:
    """The k-shot examples for each item: one fixed draw from the pool (per subject when asked), so that every
    item of a subject shares the same prompt prefix. When the pool is the evaluated set itself, an item never
    sees itself: one spare example is drawn to take its place."""
    if shots == 0:
        return lambda item: []
    same_set = pool is items
    groups: dict[str, list[MultipleChoiceItem]] = defaultdict(list)
    for example in pool:
        groups[example.subject if by_subject else ""].append(example)
    drawn = {}
    for key, examples in groups.items():
        rng = random.Random(f"{seed}/{key}")
        ordered = examples if not same_set and by_subject else rng.sample(examples, len(examples))
        drawn[key] = ordered[: shots + int(same_set)]

    def shots_for(item: MultipleChoiceItem) -> list[MultipleChoiceItem]:
        candidates = drawn.get(item.subject if by_subject else "", [])
        return [e for e in candidates if e is not item][:shots]

    return shots_for


def build_requests(model, items, fmt: PromptFormat, shots_for, chat: bool) -> list[list[Request]]:
    """Per item, one Request per choice."""
    tokenizer = model.tokenizer
    out = []
    for item in items:
        examples = shots_for(item)
        if chat:
            messages = []
            for ex in examples:
                messages += [{"role": "user", "content": fmt.chat_question(ex)},
                             {"role": "assistant", "content": LETTERS[ex.answer]}]
            messages.append({"role": "user", "content": fmt.chat_question(item)})
            context = tuple(model.encode_chat(messages))
            out.append([Request(context, tuple(tokenizer.encode(LETTERS[i]))) for i in range(len(item.choices))])
        else:
            prefix = fmt.header(item) + "".join(fmt.demo(ex) + "\n\n" for ex in examples)
            out.append([encode_pair(tokenizer, prefix + context, continuation)
                        for context, continuation in fmt.pairs(item)])
    return out


def evaluate_multiple_choice(model, scorer: Scorer, task: str, items: list[MultipleChoiceItem],
                             pool: list[MultipleChoiceItem], fmt: PromptFormat, shots: int, chat: bool,
                             by_subject: bool, seed: int = 1234, progress=None) -> TaskResult:
    shots_for = choose_shots(items, pool if pool else items, shots, seed, by_subject)
    per_item = build_requests(model, items, fmt, shots_for, chat)
    flat = [r for requests in per_item for r in requests]
    scores = iter(scorer.loglikelihood(flat, progress))
    correct, correct_norm, samples = [], [], []
    by_group: dict[str, list[bool]] = defaultdict(list)
    for item, requests in zip(items, per_item):
        logprobs = [next(scores).logprob for _ in requests]
        # letters and Winogrande's shared continuation have equal lengths: acc_norm equals acc there
        lengths = [len(c) if fmt.style == "cloze" and not chat else 1 for c in item.choices]
        pick = max(range(len(logprobs)), key=logprobs.__getitem__)
        pick_norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / max(1, lengths[i]))
        correct.append(pick == item.answer)
        correct_norm.append(pick_norm == item.answer)
        if item.subject:
            by_group[item.subject].append(pick == item.answer)
        samples.append({"id": item.id, "target": item.answer, "prediction": pick, "logprobs": logprobs,
                        "correct": pick == item.answer})
    metrics = accuracy_metrics(correct) | accuracy_metrics(correct_norm, "acc_norm")
    breakdown = {s: {"acc": sum(v) / len(v), "n": len(v)} for s, v in by_group.items()} if by_subject else {}
    return TaskResult(task, metrics, len(items), len(shots_for(items[0])) if items else 0, 0.0, breakdown, samples)
