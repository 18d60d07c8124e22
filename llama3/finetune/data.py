"""Fine-tuning data: JSONL records in the common chat formats -> token ids, with labels only on the tokens to learn.

Formats (one JSON object per line, detected per record):
  OpenAI        {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
  ShareGPT      {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
  Alpaca        {"instruction": ..., "input": ... (optional), "output": ...}
  completion    {"prompt": ..., "completion": ...}
  preference    {"prompt": ..., "chosen": ..., "rejected": ...}  (DPO; prompt and answers: text or messages)

Every conversation is rendered with the model's own chat format. Labels come from token boundaries, not from
searching the text: each message is encoded on its own (its header separately from its body) and the spans are
concatenated, so we know exactly which ids an assistant turn produced. The ids are the same the model sees at
inference, where the prompt is encoded in one piece (tests/test_finetune_data.py checks this).
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..train.data import IGNORE

LabelStrategy = Literal["assistant", "last", "all"]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "tool": "tool", "function_response": "tool"}


class DataError(ValueError):
    """A data file or record that cannot be trained on; the message names the file, the line and the problem."""


# ---- records -> messages ------------------------------------------------------------------------------------------

def _text(record: dict, key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _check_messages(messages, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field {key!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{key}[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{key}[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{key}[{i}]: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError("field 'conversations' must be a non-empty list of turns")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
            who = t.get("from") if isinstance(t, dict) else t
            raise DataError(f"conversations[{i}]: unknown speaker {who!r} (expected one of "
                            f"{', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    return _check_messages(messages, "conversations")


def record_to_messages(record) -> list[dict]:
    """The conversation of one SFT record, in OpenAI form; raises DataError when it is not a usable one."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _check_messages(record["messages"], "messages")
    elif "conversations" in record:
        messages = _sharegpt(record["conversations"])
    elif "instruction" in record:
        instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                    {"role": "assistant", "content": _text(record, "output")}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record, "system")})
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": _text(record, "prompt")},
                    {"role": "assistant", "content": _text(record, "completion")}]
    elif "chosen" in record:
        raise DataError("this is a preference pair (prompt/chosen/rejected): train it with --dpo")
    else:
        raise DataError(f"unknown record format with keys {sorted(record)[:6]}: expected messages, conversations, "
                        f"instruction/output or prompt/completion")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError("no assistant message with content: nothing to learn")
    return messages


def _turns(value, key: str, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _check_messages(value, key)


def record_to_preference(record) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen reply, rejected reply) of one preference record."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise DataError(f"a preference pair needs prompt, chosen and rejected; missing {', '.join(missing)}")
    prompt = _turns(record["prompt"], "prompt", "user")
    chosen = _turns(record["chosen"], "chosen", "assistant")
    rejected = _turns(record["rejected"], "rejected", "assistant")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if [m["role"] for m in reply] != ["assistant"] or not reply[0]["content"].strip():
            raise DataError(f"{key} must be one non-empty assistant reply")
    if chosen[0]["content"] == rejected[0]["content"]:
        raise DataError("chosen and rejected are the same text")
    return prompt, chosen, rejected


# ---- messages -> token spans -> (tokens, labels) ------------------------------------------------------------------

@dataclass
class Span:
    """The ids one piece of the rendered conversation produced: a message's header, or its body (content and
    end-of-turn). `message` is the index of the message it belongs to (-1: text before the first message)."""
    ids: list[int]
    message: int
    is_body: bool


def render_spans(chat_format, messages: list[dict]) -> list[Span]:
    """Encode a conversation piece by piece with the model's chat format."""
    if hasattr(chat_format, "encode_message"):  # Llama 3's ChatFormat: the pieces are its own building blocks
        spans = [Span([chat_format.tokenizer.bos_id], -1, False)]
        for i, m in enumerate(messages):
            body = chat_format.encode_message(m)
            header = chat_format.encode_header(m)
            spans += [Span(header, i, False), Span(body[len(header):], i, True)]
        return spans
    return _template_spans(chat_format, messages)


def _template_spans(chat_format, messages: list[dict]) -> list[Span]:
    """A Jinja chat template renders whole conversations, so a message's text is the difference between rendering
    the conversation up to it and up to the one before; an assistant message's header is what the generation
    prompt adds. Each piece of text is encoded on its own."""
    tokenizer = chat_format.tokenizer
    specials = re.compile("|".join(re.escape(s) for s in sorted(tokenizer.special_tokens, key=len, reverse=True)))
    for i, m in enumerate(messages):
        if found := specials.search(m["content"]):
            raise DataError(f"message {i} contains the special token {found.group()!r}, which would change the "
                            f"conversation's structure")

    def piece(text: str, before: str, what: str) -> list[int]:
        if not text.startswith(before):
            raise DataError(f"the chat template renders {what} differently from the conversation before it, so "
                            f"turns cannot be separated (templates that rewrite earlier turns are not supported)")
        return tokenizer.encode(text[len(before):], allowed_special="all")

    done = chat_format.render([], add_generation_prompt=False)
    spans = [Span(tokenizer.encode(done, allowed_special="all"), -1, False)] if done else []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            opened = chat_format.render(messages[:i], add_generation_prompt=True)
            spans.append(Span(piece(opened, done, f"the generation prompt before message {i}"), i, False))
            done = opened
        text = chat_format.render(messages[:i + 1], add_generation_prompt=False)
        spans.append(Span(piece(text, done, f"message {i}"), i, True))
        done = text
    return spans


def _through_stop(ids: list[int], stop_ids) -> list[int]:
    """Labels of an assistant body: the reply and its end-of-turn token; anything a template adds after the
    end-of-turn token (a newline) is never generated, so it is not learned."""
    for k, t in enumerate(ids):
        if t in stop_ids:
            return ids[:k + 1] + [IGNORE] * (len(ids) - k - 1)
    return list(ids)


def tokenize_conversation(chat_format, messages: list[dict], strategy: LabelStrategy = "assistant"
                          ) -> tuple[list[int], list[int]]:
    """(tokens, labels): labels[i] is tokens[i] where it is learned, IGNORE elsewhere.

    strategy "assistant": every assistant reply; "last": only the final assistant reply; "all": every token.
    The first token is never a label (nothing precedes it), which also keeps packed examples independent."""
    stop_ids = chat_format.tokenizer.stop_ids
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    tokens, labels = [], []
    for span in render_spans(chat_format, messages):
        tokens += span.ids
        reply = span.is_body and span.message >= 0 and messages[span.message]["role"] == "assistant"
        if strategy == "all":
            labels += span.ids
        elif reply and (strategy == "assistant" or span.message == last):
            labels += _through_stop(span.ids, stop_ids)
        else:
            labels += [IGNORE] * len(span.ids)
    if labels:
        labels[0] = IGNORE
    return tokens, labels


# ---- files -> examples --------------------------------------------------------------------------------------------

@dataclass
class Example:
    tokens: list[int]
    labels: list[int]
    line: int  # where it came from, for messages about it


@dataclass
class PreferencePair:
    chosen: Example  # prompt + chosen reply; labels on the reply only
    rejected: Example
    line: int


@dataclass
class LoadReport:
    path: str
    records: int = 0
    truncated: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def summary(self) -> str:
        kept = self.records - len(self.skipped)
        text = f"{self.path}: {kept} of {self.records} records"
        if self.truncated:
            text += f", {self.truncated} truncated"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; a line that is not JSON yields its DataError."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, DataError(f"not valid JSON ({e.msg} at column {e.colno})")


def _truncate(tokens: list[int], labels: list[int], max_len: int, report: LoadReport) -> tuple[list[int], list[int]]:
    if len(tokens) > max_len:
        report.truncated += 1
        tokens, labels = tokens[:max_len], labels[:max_len]
    if all(label == IGNORE for label in labels):
        raise DataError(f"no tokens to learn within the first {max_len} tokens (raise seq_len or shorten it)")
    return tokens, labels


def _load(path, parse, on_error: Literal["skip", "raise"], log) -> tuple[list, LoadReport]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    report = LoadReport(str(path))
    items = []
    for n, record in read_jsonl(path):
        report.records += 1
        try:
            if isinstance(record, DataError):
                raise record
            items.append(parse(record, n, report))
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"{path}:{n}: {e}") from None
            report.skipped.append((n, str(e)))
            if log is not None:
                print(f"{path}:{n}: skipped: {e}", file=log)
    if not items:
        raise DataError(f"{path}: no usable records" + (f" (first problem: line {report.skipped[0][0]}: "
                                                        f"{report.skipped[0][1]})" if report.skipped else ""))
    return items, report


def load_sft(path, chat_format, *, max_len: int, strategy: LabelStrategy = "assistant",
             on_error: Literal["skip", "raise"] = "skip", log=sys.stderr) -> tuple[list[Example], LoadReport]:
    """Examples of a JSONL file, each at most max_len tokens. Bad records are reported with their line number and
    skipped, or with on_error="raise" the first one stops the load."""
    def parse(record, n, report):
        tokens, labels = tokenize_conversation(chat_format, record_to_messages(record), strategy)
        return Example(*_truncate(tokens, labels, max_len, report), line=n)
    return _load(path, parse, on_error, log)


def load_preferences(path, chat_format, *, max_len: int, on_error: Literal["skip", "raise"] = "skip",
                     log=sys.stderr) -> tuple[list[PreferencePair], LoadReport]:
    def parse(record, n, report):
        prompt, chosen, rejected = record_to_preference(record)
        pair = [Example(*_truncate(*tokenize_conversation(chat_format, prompt + reply, "last"), max_len, report),
                        line=n) for reply in (chosen, rejected)]
        return PreferencePair(*pair, line=n)
    return _load(path, parse, on_error, log)


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a fixed random `fraction` of the items (at least one when fraction > 0) held out."""
    if not 0 <= fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(items))) if fraction > 0 else 0
    if n_val >= len(items):
        raise DataError(f"val_fraction {fraction} leaves no training examples out of {len(items)}")
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ---- examples -> rows -> batches ----------------------------------------------------------------------------------

@dataclass
class Row:
    """One sequence of the batch: tokens, labels and each token's position within its example."""
    tokens: list[int]
    labels: list[int]
    positions: list[int]


def as_row(example: Example) -> Row:
    return Row(example.tokens, example.labels, list(range(len(example.tokens))))


def pack(examples: list[Example], max_len: int) -> list[Row]:
    """Greedily concatenate consecutive examples into rows of at most max_len tokens. Positions restart at 0 at
    each example, which is what the attention mask uses to keep examples apart."""
    rows, current = [], Row([], [], [])
    for ex in examples:
        if current.tokens and len(current.tokens) + len(ex.tokens) > max_len:
            rows.append(current)
            current = Row([], [], [])
        current.tokens += ex.tokens
        current.labels += ex.labels
        current.positions += range(len(ex.tokens))
    if current.tokens:
        rows.append(current)
    return rows


def collate(rows: list[Row], pad_id: int, length: int | None = None, n_rows: int | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, targets, positions), each (B, T): inputs are tokens[:-1] and targets labels[1:], right-padded to
    `length` (default: the longest row), and with `n_rows` to that many rows (padding rows learn nothing). Padding
    positions are 0, so with document masking each pad token is its own one-token document and never attended to
    by real tokens."""
    T = (length or max(len(r.tokens) for r in rows)) - 1
    B = n_rows or len(rows)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.tokens) - 1
        inputs[i, :n] = torch.tensor(r.tokens[:-1])
        targets[i, :n] = torch.tensor(r.labels[1:])
        positions[i, :n] = torch.tensor(r.positions[:-1])
    return inputs, targets, positions


class Batches:
    """Endless batches of rows, reshuffled every epoch. Global batch k is rows [k*B*W, (k+1)*B*W) of the epoch's
    order and data-parallel rank r takes the r-th block of B of them, so the data does not depend on the layout.
    A partial last batch is dropped. Its position can be saved and restored (state_dict)."""

    def __init__(self, rows: list, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        if len(rows) < batch_size * world_size:
            raise DataError(f"{len(rows)} rows are fewer than one global batch of {batch_size * world_size}; lower "
                            f"batch_size or add data")
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.seed = seed
        self.per_epoch = len(rows) // (batch_size * world_size)
        self.step = 0

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def __iter__(self):
        return self

    def __next__(self) -> list:
        epoch, k = divmod(self.step, self.per_epoch)
        first = (k * self.world_size + self.rank) * self.batch_size
        self.step += 1
        return [self.rows[i] for i in self.order(epoch)[first:first + self.batch_size]]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def fixed_batches(rows: list, batch_size: int, *, rank: int = 0, world_size: int = 1
                  ) -> Iterator[tuple[list, bool]]:
    """Every row once, in order (validation): (this rank's block of each global batch, True). Every rank gets the
    same number of batches, since data-parallel forwards run in step; a rank past the end gets (the first rows,
    False), to run and not count."""
    per_step = batch_size * world_size
    for first in range(0, len(rows), per_step):
        mine = rows[first + rank * batch_size:first + (rank + 1) * batch_size]
        yield (mine, True) if mine else (rows[:batch_size], False)
