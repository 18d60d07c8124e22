"""Constrained decoding: JSON schemas, regular expressions and Lark grammars compiled by llguidance against the
model's own vocabulary, and a per-request `Constraint` that masks a row of logits to the tokens the grammar allows.

llguidance builds its token trie from raw token bytes, so both our tokenizers work: the Llama 3 tiktoken ranks (ids
equal ranks) and a byte-level BPE's byte spellings (special tokens marked, as llguidance wants, by a 0xFF byte).
The end-of-turn tokens are its end-of-sequence tokens: allowed only where the grammar may end, forced where it must.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor

from .tools import PYTHON_TAG, tool_function


class ConstraintError(ValueError):
    """A grammar or schema llguidance cannot compile, or a token the grammar does not allow."""


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConstraintError("constrained decoding needs the llguidance package: pip install llguidance") from None
    return llguidance


class _ByteVocabulary:
    """A byte-level BPE tokenizer as llguidance's TokenizerWrapper expects it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.tokens = [b"\xff" + b if i in tokenizer.special_ids else b for i, b in enumerate(tokenizer.token_bytes)]

    def __call__(self, text: bytes | str) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


def ll_tokenizer(tokenizer):
    """llguidance's view of our tokenizer (built once per tokenizer: ~1 s for 128K tokens)."""
    cached = getattr(tokenizer, "_ll_tokenizer", None)
    if cached is not None:
        return cached
    llg = _llguidance()
    eos = sorted(tokenizer.stop_ids)
    if getattr(tokenizer, "rank_to_id", None) is None:  # Meta's tiktoken tokenizer: ids are ranks
        from llguidance.tiktoken import lltokenizer_from_encoding
        ll = lltokenizer_from_encoding(tokenizer.encoding, n_vocab=tokenizer.vocab_size, eos_token=eos)
    else:
        ll = llg.LLTokenizer(llg.TokenizerWrapper(_ByteVocabulary(tokenizer)), n_vocab=tokenizer.vocab_size,
                             eos_token=eos)
    tokenizer._ll_tokenizer = ll
    return ll


JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# ---- grammars (llguidance's JSON grammar text) ------------------------------------------------------------------

def json_schema_grammar(schema: dict | str | None) -> str:
    """Output that is one JSON value valid under `schema` (None: any JSON object, OpenAI's json_object mode)."""
    llg = _llguidance()
    try:
        schema = {"type": "object"} if schema is None else json.loads(schema) if isinstance(schema, str) else schema
        # One layout ({"a": 1, "b": [2, 3]}): free whitespace only lets a small model wander into newlines.
        return llg.LLMatcher.grammar_from_json_schema(finite_numbers(schema), overrides=JSON_LAYOUT)
    except ValueError as e:
        raise ConstraintError(f"invalid JSON schema: {e}") from None


def regex_grammar(regex: str) -> str:
    return _llguidance().LLMatcher.grammar_from_regex(regex)


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


_LITERAL_KEYS = ("enum", "const", "default", "examples")
NUMBER_STEP = 1e-6  # numbers are written with at most 6 decimals...
NUMBER_LIMIT = 10**15  # ...and at most 15 digits before the point, unless the schema bounds them itself


def _rewrite(schema, fix):
    """Apply fix to every (sub)schema, bottom up."""
    if isinstance(schema, list):
        return [_rewrite(s, fix) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return fix({k: v if k in _LITERAL_KEYS else _rewrite(v, fix) for k, v in schema.items()})


def _close_object(schema: dict) -> dict:
    if "properties" in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def _finite_number(schema: dict) -> dict:
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    out = dict(schema)
    if "number" in types and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_STEP
    if "number" in types or "integer" in types:
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = NUMBER_LIMIT
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -NUMBER_LIMIT
    return out


def closed(schema):
    """The schema with every object that lists its properties closed to others (unless it says otherwise): the
    calls it allows still validate against the original, and a small model cannot wander off into invented keys."""
    return _rewrite(schema, _close_object)


def finite_numbers(schema):
    """The schema with numbers capped as llama.cpp's grammars cap them (6 decimals, 15 integral digits unless
    bounded): every value it allows is valid under the original, and a model sampling at temperature 1 cannot run
    on writing digits until max_tokens cuts the JSON off."""
    return _rewrite(schema, _finite_number)


def tool_calls_grammar(tools: list[dict], parallel: bool = True, python_tag: bool = False,
                       leading_space: bool = False) -> str:
    """Replies that are tool calls, `{"name": NAME, "parameters": ARGUMENTS}` with ARGUMENTS valid under that tool's
    parameter schema; several separated by "; " or a newline when `parallel`; optionally after <|python_tag|>, and
    after whitespace when `leading_space` (a lazy constraint starts on a token that may begin with a space)."""
    choices = []
    for tool in tools:
        function = tool_function(tool)
        parameters = finite_numbers(closed(function.get("parameters") or {"type": "object", "properties": {}}))
        choices.append({"type": "object", "properties": {"name": {"const": function["name"]},
                                                         "parameters": parameters},
                        "required": ["name", "parameters"], "additionalProperties": False})
    schema = json.dumps({**(choices[0] if len(choices) == 1 else {"anyOf": choices}), "x-guidance": JSON_LAYOUT})
    start = ("/[ \\t\\n]*/ " if leading_space else "") + (f"{PYTHON_TAG}? " if python_tag else "")
    more = ' (("; " | "\\n") call)*' if parallel else ""
    return lark_grammar(f"start: {start}call{more}\ncall: %json {schema}\n")


def grammar_for(*, json_schema: dict | str | None = None, json_object: bool = False, regex: str | None = None,
                grammar: str | None = None) -> str | None:
    """At most one kind of constraint -> its grammar (None when none is given)."""
    given = [k for k, v in (("json_schema", json_schema), ("json_object", json_object or None), ("regex", regex),
                            ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"give one constraint, not {' and '.join(given)}")
    if json_schema is not None or json_object:
        return json_schema_grammar(json_schema)
    if regex is not None:
        return regex_grammar(regex)
    if grammar is not None:
        return lark_grammar(grammar)
    return None


# ---- the per-request matcher ---------------------------------------------------------------------------------

class Constraint:
    """One generation's grammar state. `mask_(logits)` sets the logits of tokens the grammar forbids next to -inf;
    `accept(token)` moves the grammar on by the sampled token.

    lazy=True (tool_choice "auto"): no constraint until the reply starts a tool call ('{' or <|python_tag|> after
    any whitespace); from there on the reply must be calls. A reply that starts otherwise is never constrained.
    """

    def __init__(self, tokenizer, grammar: str, lazy: bool = False):
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        ll = ll_tokenizer(tokenizer)
        error = llg.LLMatcher.validate_grammar(grammar, ll)
        if error:
            raise ConstraintError(f"cannot compile the grammar: {error}")
        self._new_matcher = lambda: llg.LLMatcher(ll, grammar, log_level=0)
        self.matcher = None if lazy else self._new_matcher()
        self.waiting = lazy  # lazy and not yet triggered
        self.pending: list[int] = []  # tokens before the trigger

    @property
    def active(self) -> bool:
        return self.matcher is not None

    def mask_(self, logits: Tensor) -> Tensor:
        """logits (V,) or (1, V), masked in place."""
        if self.matcher is None:
            return logits
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        # The bit unpacking and negation in numpy: torch's elementwise ops start OpenMP threads for every call,
        # which costs milliseconds per row on a busy machine.
        forbidden = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab_size] == 0)
        n = logits.shape[-1]
        if n > self.vocab_size:  # padded vocabulary rows: never allowed
            logits[..., self.vocab_size:] = float("-inf")
            n = self.vocab_size
        logits[..., :n].masked_fill_(forbidden[:n].to(logits.device), float("-inf"))
        return logits

    def accept(self, token: int) -> None:
        if self.waiting:
            self._maybe_trigger(token)
            return
        if self.matcher is not None and not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} is not allowed by the grammar: {self.matcher.get_error()}")

    def _maybe_trigger(self, token: int) -> None:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending).lstrip()
        if not text:
            return
        self.waiting = False
        if text.startswith("{") or text.startswith(PYTHON_TAG):
            matcher = self._new_matcher()
            if matcher.try_consume_tokens(self.pending) == len(self.pending):
                self.matcher = matcher
        elif PYTHON_TAG.startswith(text):  # still undecided
            self.waiting = True

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens (speculative decoding's rejected drafts)."""
        if n and self.matcher is not None and not self.matcher.rollback(n):
            raise ConstraintError(f"cannot roll the grammar back by {n} tokens: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar can take nothing more (only an end-of-turn token)."""
        return self.matcher is not None and self.matcher.is_stopped()
