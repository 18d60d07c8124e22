"""The task registry and `evaluate()`: find a task's files, read them, run the right kind of evaluation.

A task's files are looked up in `<data_dir>/<folder>` (or `<data_dir>` itself when that folder does not
exist); without a data dir, in the small samples shipped in llama3/eval/samples. A task may also be named
as `name:path` to point at its files directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from llama3.eval import codegen, generative, multiple_choice, readers
from llama3.eval.perplexity import evaluate_perplexity
from llama3.eval.results import TaskResult
from llama3.eval.sandbox import SandboxLimits
from llama3.eval.scoring import Scorer

SAMPLES_DIR = Path(__file__).with_name("samples")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice", "generative", "code" or "perplexity"
    reader: Callable[[Path, str], list]
    folder: str  # folder name under --data-dir (and under the shipped samples)
    shots: int  # the published setting (Llama 3 model card)
    prompt_format: str = ""  # a key of multiple_choice.FORMATS or generative.FORMATS
    by_subject: bool = False  # per-subject breakdown, and k-shot examples from the item's own subject


TASKS = {t.name: t for t in [
    Task("mmlu", "multiple_choice", readers.read_mmlu, "mmlu", 5, "mmlu", by_subject=True),
    Task("arc_challenge", "multiple_choice", readers.arc_reader("Challenge"), "arc", 25, "cloze"),
    Task("arc_easy", "multiple_choice", readers.arc_reader("Easy"), "arc", 25, "cloze"),
    Task("commonsense_qa", "multiple_choice", readers.read_commonsense_qa, "commonsense_qa", 7, "letter"),
    Task("winogrande", "multiple_choice", readers.read_winogrande, "winogrande", 5, "partial"),
    Task("boolq", "multiple_choice", readers.read_boolq, "boolq", 0, "boolq"),
    Task("hellaswag", "multiple_choice", readers.read_hellaswag, "hellaswag", 10, "hellaswag"),
    Task("gpqa", "multiple_choice", readers.gpqa_reader("main"), "gpqa", 0, "letter", by_subject=True),
    Task("gpqa_diamond", "multiple_choice", readers.gpqa_reader("diamond"), "gpqa", 0, "letter", by_subject=True),
    Task("gpqa_extended", "multiple_choice", readers.gpqa_reader("extended"), "gpqa", 0, "letter", by_subject=True),
    Task("gsm8k", "generative", readers.read_gsm8k, "gsm8k", 8, "gsm8k"),
    Task("math", "generative", readers.read_math, "math", 4, "math", by_subject=True),
    Task("humaneval", "code", readers.read_humaneval, "humaneval", 0),
    Task("mbpp", "code", readers.read_mbpp, "mbpp", 3),
    Task("perplexity", "perplexity", readers.read_text_files, "perplexity", 0),
]}


class TaskError(ValueError):
    """An unknown task name or unusable task options."""


def parse_task(spec: str) -> tuple[Task, Path | None]:
    """'mmlu' or 'mmlu:/data/mmlu' -> (task, explicit path or None)."""
    name, _, path = spec.strip().partition(":")
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name], Path(path).expanduser() if path else None


def task_root(task: Task, data_dir: Path | None, explicit: Path | None = None) -> Path:
    if explicit is not None:
        root = explicit
    elif data_dir is None:
        root = SAMPLES_DIR / task.folder
    else:
        root = data_dir / task.folder if (data_dir / task.folder).exists() else data_dir
    if not root.exists():
        raise readers.DatasetError(f"{task.name}: {root} does not exist")
    return root


@dataclass(frozen=True)
class EvalOptions:
    shots: int | None = None  # None: the task's published setting
    limit: int | None = None  # first N items only
    chat: bool = False
    batch_size: int = 8
    samples: int = 1  # completions per code problem (pass@k)
    temperature: float | None = None
    max_new_tokens: int | None = None
    window: int = 1024  # perplexity context window
    seed: int = 1234
    sandbox: SandboxLimits = SandboxLimits()


def evaluate(model, spec: str, data_dir: Path | None = None, options: EvalOptions | None = None,
             progress_factory: Callable[[str, int], Callable[[int], None]] | None = None) -> TaskResult:
    """Run one task on a `Llama` (or anything with .model, .tokenizer, .args, .encode_prompt and .encode_chat;
    generation goes through the serving engine, generative.complete). progress_factory(description, total)
    returns a callback for units done."""
    options = options or EvalOptions()
    task, explicit = parse_task(spec)
    root = task_root(task, data_dir, explicit)
    if options.chat and task.kind == "perplexity":
        raise TaskError("perplexity scores raw text; --chat does not apply to it")
    items = task.reader(root, "eval")
    if options.limit is not None:
        items = items[: options.limit]
    if not items:
        raise readers.DatasetError(f"{task.name}: no items in {root}")
    pool = task.reader(root, "fewshot")
    shots = task.shots if options.shots is None else options.shots
    scorer = Scorer(model.model, vocab_size=model.args.vocab_size, batch_size=options.batch_size)

    def progress(total: int):
        return progress_factory(task.name, total) if progress_factory else None

    start = time.perf_counter()
    if task.kind == "multiple_choice":
        fmt = multiple_choice.FORMATS[task.prompt_format]
        n_requests = sum(len(item.choices) for item in items)
        result = multiple_choice.evaluate_multiple_choice(
            model, scorer, task.name, items, pool, fmt, shots, options.chat, task.by_subject, options.seed,
            progress(n_requests))
    elif task.kind == "generative":
        result = generative.evaluate_generative(
            model, task.name, items, pool, generative.FORMATS[task.prompt_format], shots, options.chat,
            options.batch_size, options.max_new_tokens, options.seed, progress(len(items)))
    elif task.kind == "code":
        result = codegen.evaluate_code(
            model, task.name, items, pool, shots, options.chat, options.batch_size, options.samples,
            options.temperature, options.max_new_tokens or 512, options.sandbox, options.seed,
            progress(len(items) * options.samples))
    else:
        result = evaluate_perplexity(model, scorer, items, options.window, progress=progress(0))
    return replace(result, seconds=time.perf_counter() - start)
