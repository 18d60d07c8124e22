"""Readers for the evaluation datasets, each in the layout its authors publish it.

Every reader takes the folder that holds one dataset and a split role: "eval" (the split scores are reported on)
or "fewshot" (where k-shot examples come from; an empty list when the folder has none). Files are found by their
published names anywhere below the folder, so both the original release and the Hugging Face parquet export
work:

| dataset        | original release                                   | parquet export                      |
|----------------|----------------------------------------------------|-------------------------------------|
| MMLU           | data/{dev,val,test}/<subject>_<split>.csv (no header) | <subject>/{dev,validation,test}-*.parquet |
| ARC            | ARC-{Challenge,Easy}-{Train,Dev,Test}.jsonl        | ARC-{Challenge,Easy}/<split>-*.parquet |
| CommonsenseQA  | {train,dev}_rand_split.jsonl                       | <split>-*.parquet                    |
| Winogrande     | train_{xs,s,m,l,xl}.jsonl, dev.jsonl               | <split>-*.parquet                    |
| BoolQ          | train.jsonl, dev.jsonl                             | <split>-*.parquet                    |
| HellaSwag      | hellaswag_{train,val}.jsonl                        | <split>-*.parquet                    |
| GPQA           | gpqa_{main,diamond,extended}.csv                   |                                      |
| GSM-8K         | train.jsonl, test.jsonl                            | <split>-*.parquet                    |
| MATH           | {train,test}/<subject>/<n>.json, or test.jsonl      | <subject>/<split>-*.parquet          |
| HumanEval      | HumanEval.jsonl(.gz)                               | test-*.parquet                       |
| MBPP           | mbpp.jsonl (split by task_id), sanitized-mbpp.json | <split>-*.parquet                    |
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class DatasetError(ValueError):
    """A dataset file is missing, unreadable, or lacks a field."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    id: str
    question: str  # for Winogrande: the sentence with its "_" blank
    choices: list[str]
    answer: int  # index into choices
    subject: str = ""  # MMLU subject, GPQA domain
    passage: str = ""  # BoolQ


@dataclass(frozen=True)
class GenerativeItem:
    id: str
    question: str
    answer: str  # the final answer, as the dataset writes it
    solution: str = ""  # worked solution (chain of thought for few-shot prompts)
    subject: str = ""
    level: str = ""


@dataclass(frozen=True)
class CodeItem:
    id: str
    prompt: str  # HumanEval: signature + docstring; MBPP: the task description
    test: str  # code that raises if the program is wrong (run after the completion)
    entry_point: str = ""
    solution: str = ""  # the reference solution
    test_list: list[str] = field(default_factory=list)  # MBPP: assert lines shown in the prompt


# ---------------------------------------------------------------------------------------------------------------
# Files


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (one object or a list), .csv (with header) or .parquet file; .gz allowed."""
    name = path.name.removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq  # only parquet needs pyarrow

            return pq.read_table(path).to_pylist()
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8-sig")
        if name.endswith(".jsonl"):
            rows = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            return rows
        if name.endswith(".json"):
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
        if name.endswith(".csv"):
            return list(csv.DictReader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    raise DatasetError(f"{path}: unknown file type (expected .jsonl, .json, .csv or .parquet)")


def find_files(root: Path, patterns: list[str]) -> list[Path]:
    """Files below root matching any glob pattern, sorted; hidden folders skipped."""
    found = {p for pattern in patterns for p in root.rglob(pattern) if p.is_file()}
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts))


def _need(root: Path, files: list[Path], what: str) -> list[Path]:
    if not files:
        raise DatasetError(f"no {what} under {root}")
    return files


def _get(record: dict, key: str, path: Path) -> Any:
    try:
        return record[key]
    except (KeyError, TypeError):
        raise DatasetError(f"{path}: record has no field {key!r} (fields: {sorted(record)[:12]})") from None


def _records(files: list[Path]) -> list[tuple[Path, dict]]:
    return [(path, record) for path in files for record in read_records(path)]


def _split_files(root: Path, split: str, extra: dict[str, list[str]]) -> list[Path]:
    """Files of a split in the parquet export (<split>-00000-of-00001.parquet) or by the dataset's own names."""
    return find_files(root, extra.get(split, []) + [f"{split}-*.parquet"])


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice

_LETTERS = "ABCDEFGHIJ"


def read_mmlu(root: Path, role: str) -> list[MultipleChoiceItem]:
    """MMLU: per-subject CSVs (question, A, B, C, D, answer letter; no header) or per-subject parquet files
    (question, subject, choices, answer index). Few-shot examples come from the dev split."""
    if role == "eval":
        csv_split, parquet_splits = "test", ["test"]
    else:
        csv_split, parquet_splits = "dev", ["dev"]
    items = []
    for path in find_files(root, [f"*_{csv_split}.csv"]):
        subject = path.name.removesuffix(f"_{csv_split}.csv")
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
        for i, row in enumerate(rows):
            if len(row) != 6 or row[5].strip() not in _LETTERS[:4]:
                raise DatasetError(f"{path}: row {i + 1} should be question,A,B,C,D,answer-letter; got {row[:6]}")
            items.append(MultipleChoiceItem(f"{subject}/{i}", row[0], row[1:5], _LETTERS.index(row[5].strip()), subject))
    parquet = [p for s in parquet_splits for p in find_files(root, [f"{s}-*.parquet"])]
    # the export also has an "all" folder repeating every subject; use it only when there is nothing else
    if any(p.parent.name != "all" for p in parquet):
        parquet = [p for p in parquet if p.parent.name != "all"]
    for path, record in _records(parquet):
        subject = record.get("subject") or path.parent.name
        answer = _get(record, "answer", path)
        items.append(
            MultipleChoiceItem(
                f"{subject}/{len(items)}", _get(record, "question", path), list(_get(record, "choices", path)),
                _LETTERS.index(answer) if isinstance(answer, str) else int(answer), subject,
            )
        )
    if role == "eval" and not items:
        raise DatasetError(f"no MMLU test files under {root} (expected data/test/<subject>_test.csv or <subject>/test-*.parquet)")
    return items


def _labeled_choices(record: dict, path: Path) -> tuple[str, list[str], int]:
    """ARC / CommonsenseQA record, original (question: {stem, choices: [{label, text}]}) or flattened parquet
    (question: str, choices: {label: [...], text: [...]}) -> (question, choice texts, answer index)."""
    question = _get(record, "question", path)
    if isinstance(question, dict):
        choices = _get(question, "choices", path)
        labels, texts = [c["label"] for c in choices], [c["text"] for c in choices]
        stem = _get(question, "stem", path)
    else:
        choices = _get(record, "choices", path)
        labels, texts, stem = list(choices["label"]), list(choices["text"]), question
    key = _get(record, "answerKey", path)
    if key not in labels:
        raise DatasetError(f"{path}: answerKey {key!r} is not one of the labels {labels}")
    return stem, texts, labels.index(key)


def _read_labeled(root: Path, files: list[Path]) -> list[MultipleChoiceItem]:
    items = []
    for path, record in _records(files):
        stem, texts, answer = _labeled_choices(record, path)
        items.append(MultipleChoiceItem(str(record.get("id", len(items))), stem, texts, answer))
    return items


def arc_reader(variant: str) -> Callable[[Path, str], list[MultipleChoiceItem]]:
    """ARC-Challenge or ARC-Easy: ARC-<variant>-Test.jsonl, or ARC-<variant>/test-*.parquet."""

    def read_arc(root: Path, role: str) -> list[MultipleChoiceItem]:
        splits = ["Test"] if role == "eval" else ["Train"]
        files = find_files(root, [f"ARC-{variant}-{s}.jsonl" for s in splits])
        files += [p for s in splits for p in find_files(root, [f"{s.lower()}-*.parquet"]) if variant in str(p)]
        if role == "eval":
            _need(root, files, f"ARC-{variant} test file (ARC-{variant}-Test.jsonl or ARC-{variant}/test-*.parquet)")
        return _read_labeled(root, files)

    return read_arc


def read_commonsense_qa(root: Path, role: str) -> list[MultipleChoiceItem]:
    """CommonsenseQA: scored on dev (the test split has no answers)."""
    split = {"eval": "validation", "fewshot": "train"}[role]
    files = _split_files(root, split, {"validation": ["dev_rand_split.jsonl"], "train": ["train_rand_split.jsonl"]})
    if role == "eval":
        _need(root, files, "CommonsenseQA dev file (dev_rand_split.jsonl or validation-*.parquet)")
    return _read_labeled(root, files)


def read_winogrande(root: Path, role: str) -> list[MultipleChoiceItem]:
    """Winogrande: sentence with '_', option1, option2, answer '1'/'2'. Scored on dev; few-shot from the
    smallest train size present."""
    if role == "eval":
        files = _need(root, _split_files(root, "validation", {"validation": ["dev.jsonl"]}),
                      "Winogrande dev file (dev.jsonl or validation-*.parquet)")
    else:
        sizes = ["xs", "s", "m", "l", "xl"]
        files = next((f for s in sizes if (f := find_files(root, [f"train_{s}.jsonl"]))), []) or _split_files(root, "train", {})
    items = []
    for path, record in _records(files):
        sentence = _get(record, "sentence", path)
        if "_" not in sentence:
            raise DatasetError(f"{path}: Winogrande sentence has no '_' blank: {sentence[:80]!r}")
        answer = str(_get(record, "answer", path))
        if answer not in ("1", "2"):
            raise DatasetError(f"{path}: Winogrande answer must be '1' or '2', got {answer!r}")
        options = [_get(record, "option1", path), _get(record, "option2", path)]
        items.append(MultipleChoiceItem(str(record.get("qID", len(items))), sentence, options, int(answer) - 1))
    return items


def read_boolq(root: Path, role: str) -> list[MultipleChoiceItem]:
    """BoolQ: question, passage, answer true/false (or label 0/1 in the SuperGLUE export). Choices: no, yes."""
    split = {"eval": "validation", "fewshot": "train"}[role]
    files = _split_files(root, split, {"validation": ["dev.jsonl", "val.jsonl"], "train": ["train.jsonl"]})
    if role == "eval":
        _need(root, files, "BoolQ dev file (dev.jsonl or validation-*.parquet)")
    items = []
    for path, record in _records(files):
        answer = record["answer"] if "answer" in record else _get(record, "label", path)
        question = _get(record, "question", path)
        items.append(MultipleChoiceItem(str(record.get("idx", len(items))), question, ["no", "yes"], int(bool(answer)),
                                        passage=_get(record, "passage", path)))
    return items


def read_hellaswag(root: Path, role: str) -> list[MultipleChoiceItem]:
    """HellaSwag: activity_label, ctx_a, ctx_b, endings, label. Scored on val (test has no labels). The
    WikiHow contexts carry '[title]'-style markers that are cleaned as in the paper's release."""
    split = {"eval": "validation", "fewshot": "train"}[role]
    files = _split_files(root, split, {"validation": ["hellaswag_val.jsonl"], "train": ["hellaswag_train.jsonl"]})
    if role == "eval":
        _need(root, files, "HellaSwag validation file (hellaswag_val.jsonl or validation-*.parquet)")
    items = []
    for path, record in _records(files):
        ctx = _get(record, "ctx_a", path) + " " + _get(record, "ctx_b", path).capitalize()
        question = _clean_hellaswag(_get(record, "activity_label", path) + ": " + ctx)
        endings = [_clean_hellaswag(e) for e in _get(record, "endings", path)]
        label = _get(record, "label", path)
        items.append(MultipleChoiceItem(str(record.get("ind", len(items))), question, endings, int(label)))
    return items


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def gpqa_reader(subset: str) -> Callable[[Path, str], list[MultipleChoiceItem]]:
    """GPQA main/diamond/extended: gpqa_<subset>.csv with Question, Correct Answer, Incorrect Answer 1-3. The
    file lists the correct answer first, so choices are shuffled with a seed taken from each question's
    Record ID: the order is the same on every run and every machine."""

    def read_gpqa(root: Path, role: str) -> list[MultipleChoiceItem]:
        if role != "eval":
            return []  # GPQA has one split; it is evaluated zero-shot
        files = _need(root, find_files(root, [f"gpqa_{subset}.csv"]), f"gpqa_{subset}.csv")
        items = []
        for path, record in _records(files):
            correct = _get(record, "Correct Answer", path).strip()
            wrong = [_get(record, f"Incorrect Answer {i}", path).strip() for i in (1, 2, 3)]
            record_id = record.get("Record ID") or _get(record, "Question", path)
            seed = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "little")
            choices = [correct] + wrong
            random.Random(seed).shuffle(choices)
            items.append(MultipleChoiceItem(record_id, _get(record, "Question", path).strip(), choices,
                                            choices.index(correct), record.get("High-level domain", "")))
        return items

    return read_gpqa


# ---------------------------------------------------------------------------------------------------------------
# Generative


def read_gsm8k(root: Path, role: str) -> list[GenerativeItem]:
    """GSM-8K: question, answer ('...reasoning with <<calc>> notes...\\n#### 72')."""
    from llama3.eval.extract import gsm8k_reference

    split = {"eval": "test", "fewshot": "train"}[role]
    files = _split_files(root, split, {split: [f"{split}.jsonl"]})
    if role == "eval":
        _need(root, files, "GSM-8K test file (test.jsonl or test-*.parquet)")
    items = []
    for path, record in _records(files):
        full = _get(record, "answer", path)
        try:
            reference = gsm8k_reference(full)
        except ValueError as e:
            raise DatasetError(f"{path}: {e}") from None
        items.append(GenerativeItem(str(len(items)), _get(record, "question", path), reference, solution=full))
    return items


def read_math(root: Path, role: str) -> list[GenerativeItem]:
    """MATH: one JSON per problem in <split>/<subject>/<n>.json (problem, level, type, solution), or JSONL /
    parquet rows with the same fields; an explicit `answer` field (MATH-500) wins over the solution's last
    \\boxed{}."""
    from llama3.eval.extract import last_boxed

    split = {"eval": "test", "fewshot": "train"}[role]
    files = [p for p in find_files(root, ["*.json"]) if split in p.relative_to(root).parts[:-1]]
    files += find_files(root, [f"{split}.jsonl", f"{split}-*.parquet"])
    if role == "eval":
        _need(root, files, "MATH test files (test/<subject>/<n>.json, test.jsonl or <subject>/test-*.parquet)")
    items = []
    for path, record in _records(files):
        solution = _get(record, "solution", path)
        answer = record.get("answer") or last_boxed(solution)
        if answer is None:
            raise DatasetError(f"{path}: MATH solution has no \\boxed{{}} answer and the record no 'answer' field")
        subject = record.get("type") or record.get("subject") or path.parent.name
        item_id = record.get("unique_id") or str(path.relative_to(root)) + ("" if path.suffix == ".json" else f"#{len(items)}")
        items.append(GenerativeItem(item_id, _get(record, "problem", path), answer, solution, subject,
                                    str(record.get("level", ""))))
    return items


# ---------------------------------------------------------------------------------------------------------------
# Code


def read_humaneval(root: Path, role: str) -> list[CodeItem]:
    """HumanEval: task_id, prompt, canonical_solution, test (defines check(candidate)), entry_point."""
    if role != "eval":
        return []  # HumanEval is zero-shot: the prompt is the function to complete
    files = _need(root, find_files(root, ["HumanEval.jsonl", "HumanEval.jsonl.gz", "test-*.parquet"]),
                  "HumanEval.jsonl(.gz) or test-*.parquet")
    items = []
    for path, record in _records(files):
        entry = _get(record, "entry_point", path)
        test = _get(record, "test", path) + f"\n\ncheck({entry})\n"
        items.append(CodeItem(_get(record, "task_id", path), _get(record, "prompt", path), test, entry,
                              record.get("canonical_solution", "")))
    return items


# The MBPP paper's split of mbpp.jsonl by task_id.
_MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601), "train": range(601, 975)}


def read_mbpp(root: Path, role: str) -> list[CodeItem]:
    """MBPP: task_id, text (or prompt in the sanitized set), code, test_list, test_setup_code. mbpp.jsonl holds
    every split and is cut by task_id; tasks 1-10 are the few-shot prompts."""
    split = {"eval": "test", "fewshot": "prompt"}[role]
    full = find_files(root, ["mbpp.jsonl", "sanitized-mbpp.json"])
    files = full or _split_files(root, split, {})
    if role == "eval":
        _need(root, files, "MBPP file (mbpp.jsonl, sanitized-mbpp.json or test-*.parquet)")
    items = []
    for path, record in _records(files):
        task_id = int(_get(record, "task_id", path))
        if full and task_id not in _MBPP_SPLITS[split]:
            continue
        description = record["text"] if "text" in record else _get(record, "prompt", path)
        tests = list(_get(record, "test_list", path))
        setup = record.get("test_setup_code", "") or "\n".join(record.get("test_imports", []) or [])
        items.append(CodeItem(str(task_id), description, setup + "\n" + "\n".join(tests) + "\n", "",
                              _get(record, "code", path), tests))
    return items


def read_text_files(root: Path, role: str) -> list[Path]:
    """Perplexity: every .txt file below root (or root itself when it is a file)."""
    if role != "eval":
        return []
    files = [root] if root.is_file() else find_files(root, ["*.txt"])
    return _need(root, files, ".txt files")
