"""Tokenizers and chat formats.

- `Tokenizer`: Meta's Llama 3 tokenizer (tiktoken BPE, 128000 ranks + 256 special tokens).
- `BPETokenizer`: GPT-2-style byte-level BPE read from a GGUF file or a Hugging Face tokenizer.json.
- `ChatFormat`: Meta's Llama 3 dialog encoding; `TemplateChatFormat`: a Jinja chat template rendered the way
  Hugging Face transformers renders it.

Both tokenizers share one interface: `encode(text, *, bos, eos, allowed_special, disallowed_special)`, `decode(ids)`,
`bos_id`, `eos_id`, `pad_id`, `stop_ids`, `vocab_size`. Text that merely contains a special token's name (say
"<|eot_id|>") is encoded as plain text unless `allowed_special` names it (or is "all"), so text from users cannot
smuggle in control tokens (`ChatFormat` keeps it that way; a `TemplateChatFormat`, like transformers, does not).
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import json
import re
from collections.abc import Collection, Sequence
from collections.abc import Set as AbstractSet
from datetime import date, datetime
from pathlib import Path
from typing import Literal

import jinja2
import jinja2.meta
import numpy as np
import tiktoken
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tools import (BUILTIN_TOOLS, PYTHON_TAG, call_arguments, generic_tool_messages, llama31_call_text,
                    llama31_system_prompt, llama31_tools_message, tool_function)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's "smollm" family first cuts every digit out on its own, then applies the GPT-2 pattern to the pieces in
# between. In one pattern: a digit is its own match, and a run of whitespace may also end where a digit begins.
DIGITS_GPT2_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

# `tokenizer.ggml.pre` names, as llama.cpp spells them, of the pre-tokenizers we support, and those for which
# llama.cpp adds the bos token when the file has no `tokenizer.ggml.add_bos_token`.
GGUF_PRE_TOKENIZERS = {
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3"], LLAMA3_PATTERN),
    **dict.fromkeys(["gpt2", "gpt-2"], GPT2_PATTERN),
    **dict.fromkeys(["smollm", "starcoder", "refact", "codeshell"], DIGITS_GPT2_PATTERN),
}
GGUF_PRE_TOKENIZERS_ADDING_BOS = {"llama-bpe", "llama3", "llama-v3"}

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]  # fmt: skip
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIAL_TOKENS))]

# Meta's tokenizer encodes at most 400k characters at a time and cuts runs of whitespace or non-whitespace every 25k
# characters (for tiktoken's old regex engine, openai/tiktoken#195). The cuts change ids, so only the Llama 3
# tokenizer makes them, to give Meta's ids exactly; byte-level BPE tokenizers from GGUF / tokenizer.json encode the
# text whole, as Hugging Face tokenizers and llama.cpp do.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")

# Control tokens that end a chat turn in common vocabularies (llama.cpp stops on these too).
END_OF_TURN_TOKENS = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"}

SpecialSet = Literal["all"] | AbstractSet[str] | Collection[str]


class TokenizerError(ValueError):
    """A tokenizer file, its metadata or a chat template is missing or malformed."""


def _pieces(text: str, chunk_chars: int):
    """Cut text as Meta does before BPE: chunks of `chunk_chars`, and in each, runs over 25k chars every 25k chars."""
    for i in range(0, len(text), chunk_chars):
        chunk, start = text[i : i + chunk_chars], 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


class _TiktokenBase:
    """Encode/decode over a tiktoken Encoding whose ranks map to token ids through `rank_to_id` (None: identity)."""

    encoding: tiktoken.Encoding
    rank_to_id: np.ndarray | None = None
    special_tokens: dict[str, int]  # matched only when allowed_special allows
    always_matched: frozenset[str] = frozenset()  # added tokens that are not special: matched wherever they occur
    bos_id: int | None
    eos_id: int | None

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: SpecialSet = (),
        disallowed_special: SpecialSet = (),
    ) -> list[int]:
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        allowed |= self.always_matched
        ranks = []
        for piece in self._chunks(text):
            ranks += self.encoding.encode(piece, allowed_special=allowed, disallowed_special=disallowed)
        ids = ranks
        if self.rank_to_id is not None:
            # Vocabularies may lack a few byte tokens (control characters, bytes of unassigned code points): like
            # llama.cpp, such bytes take part in BPE as unmergeable symbols and are then dropped.
            mapped = self.rank_to_id[ranks]
            ids = mapped[mapped >= 0].tolist()
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):
            raise TokenizerError("this tokenizer has no beginning/end-of-text token to add")
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def _chunks(self, text: str):
        return (text,)

    @property
    def bos_token(self) -> str:
        return "" if self.bos_id is None else self.decode([self.bos_id])

    @property
    def eos_token(self) -> str:
        return "" if self.eos_id is None else self.decode([self.eos_id])


class Tokenizer(_TiktokenBase):
    """Meta's Llama 3 tokenizer: tiktoken BPE ranks from a `tokenizer.model` file plus 256 special tokens.

    Without a path, reads the `tokenizer.model` shipped in Meta's `llama-models` package.
    """

    add_bos = True
    chat_template = None

    def __init__(self, model_path: str | Path | None = None):
        if model_path is None:
            name = "llama_models/llama3/tokenizer.model"
            resource = importlib.resources.files("llama_models.llama3") / "tokenizer.model"
            data = resource.read_bytes()
            model_path = Path(str(resource))
        else:
            name = str(model_path)
            if not Path(model_path).is_file():
                raise TokenizerError(f"{name}: tokenizer file not found")
            data = Path(model_path).read_bytes()
        ranks = load_tiktoken_ranks(data, name)
        self.model_path = Path(model_path)  # checkpoint writers copy the file next to the weights
        self.special_tokens = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            Path(name).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset({self.eos_id, self.eot_id, self.eom_id})

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def _chunks(self, text: str):
        return _pieces(text, MAX_ENCODE_CHARS)


def load_tiktoken_ranks(data: bytes, name: str) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `<base64 token> <rank>` per line."""
    ranks = {}
    for line_number, line in enumerate(data.splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{name}: line {line_number} is not '<base64 token> <rank>'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{name}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character map: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


_FROM_BYTE_LEVEL = str.maketrans({char: chr(b) for b, char in byte_to_unicode().items()})


def _byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token spells (GPT-2's byte -> character map undone)."""
    try:
        return token.translate(_FROM_BYTE_LEVEL).encode("latin-1")
    except UnicodeEncodeError:  # not spelled byte-level (some converted vocabularies): take the text itself
        return token.encode()


class BPETokenizer(_TiktokenBase):
    """GPT-2-style byte-level BPE, from a token list, merges and a pre-tokenizer regex.

    Runs on tiktoken: every merge, in order, gives its merged token the next rank, so tiktoken's "merge the
    adjacent pair whose result has the lowest rank" replays the merge list; `rank_to_id` maps ranks back to the
    vocabulary's ids. Merge-order BPE (Hugging Face, llama.cpp) looks pairs up by their two parts, tiktoken by what
    they make; the two agree where every token is made the way BPE training made it, as in trained vocabularies
    (tested on the whole vocabulary of the default model). A hand-made merge list could make them differ.
    """

    def __init__(
        self,
        tokens: Sequence[str | None],
        merges: Sequence[tuple[str, str]],
        pattern: str,
        *,
        special: AbstractSet[int] = frozenset(),
        always_matched: AbstractSet[int] = frozenset(),
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        source: str = "tokenizer",
    ):
        """tokens[id] is the byte-level spelling of a vocabulary token, or the literal text of a special or added
        token (ids in `special` / `always_matched`); None marks an unused id."""
        literal = special | always_matched
        self.tokens, self.merges, self.pattern = list(tokens), list(merges), pattern
        self.special_ids, self.always_matched_ids = frozenset(special), frozenset(always_matched)
        id_of = {t: i for i, t in enumerate(tokens) if t is not None and i not in literal}
        self.token_bytes = [
            b"" if t is None else t.encode() if i in literal else _byte_level_bytes(t) for i, t in enumerate(tokens)
        ]
        ranks, rank_to_id = {}, []
        for b, char in byte_to_unicode().items():
            ranks[bytes([b])] = len(rank_to_id)
            rank_to_id.append(id_of.get(char, -1))  # -1: a byte without a token, dropped from the output
        for left, right in merges:
            if left + right not in id_of:
                raise TokenizerError(f"{source}: merge {left!r} {right!r} makes a token missing from the vocabulary")
            merged = self.token_bytes[id_of[left + right]]
            if merged not in ranks:
                ranks[merged] = len(rank_to_id)
                rank_to_id.append(id_of[left + right])
        self.special_tokens = {tokens[i]: i for i in sorted(special)}
        matched = {tokens[i]: i for i in sorted(special | always_matched)}
        self.always_matched = frozenset(tokens[i] for i in always_matched)
        special_ranks = {text: len(rank_to_id) + k for k, text in enumerate(matched)}
        rank_to_id += matched.values()
        self.encoding = tiktoken.Encoding(source, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ranks)
        self.rank_to_id = np.array(rank_to_id, dtype=np.int64)
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.add_bos, self.chat_template = bos_id, eos_id, add_bos, chat_template
        self.pad_id = eos_id if pad_id is None else pad_id  # padding is masked out: any token will do
        ends = {i for text, i in self.special_tokens.items() if text in END_OF_TURN_TOKENS}
        self.stop_ids = frozenset(ends | ({eos_id} - {None}))

    def cache_state(self) -> dict:
        """Everything the constructor computed, in plain types (lists, dicts, str, bytes) that
        `torch.load(weights_only=True)` reads back without running code: llama3/weights/cache.py keeps it so that a
        later load skips building the BPE tables (seconds for a 128k vocabulary)."""
        state = {k: v for k, v in vars(self).items() if k not in ("encoding", "rank_to_id")}
        sets = sorted(k for k, v in state.items() if isinstance(v, frozenset))
        state.update({k: sorted(state[k]) for k in sets}, frozensets=sets, rank_to_id=self.rank_to_id.tolist())
        enc = self.encoding
        state["encoding"] = {"name": enc.name, "pat_str": enc._pat_str, "mergeable_ranks": enc._mergeable_ranks,
                             "special_tokens": enc._special_tokens}
        return state

    @classmethod
    def from_cache_state(cls, state: dict) -> BPETokenizer:
        state = dict(state)
        tokenizer = cls.__new__(cls)
        tokenizer.encoding = tiktoken.Encoding(**state.pop("encoding"))
        tokenizer.rank_to_id = np.array(state.pop("rank_to_id"), dtype=np.int64)
        for k in state.pop("frozensets"):
            state[k] = frozenset(state[k])
        vars(tokenizer).update(state)
        return tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        # Byte-level tokens may end inside a UTF-8 character; "replace" keeps partial output readable.
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def to_tokenizer_json(self) -> tuple[dict, dict]:
        """This tokenizer as Hugging Face files: the contents of tokenizer.json and tokenizer_config.json."""
        literal = self.special_ids | self.always_matched_ids
        # Every token stays in the BPE vocabulary, as Hugging Face's own files have it: `tokenizers` numbers an added
        # token that the vocabulary lacks after the vocabulary, which would move <|im_start|> and its kind.
        vocab = {t: i for i, t in enumerate(self.tokens) if t is not None}
        added = [{"id": i, "content": self.tokens[i], "special": i in self.special_ids, "single_word": False,
                  "lstrip": False, "rstrip": False, "normalized": False} for i in sorted(literal)]
        data = {
            "version": "1.0", "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "vocab": vocab, "merges": [[a, b] for a, b in self.merges]},
        }
        def name(i):
            return None if i is None else self.tokens[i]

        config = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "pad_token": name(self.pad_id),
                  "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        return data, config

    @classmethod
    def from_gguf(cls, source) -> BPETokenizer:
        """From a GGUF file's `tokenizer.ggml.*` metadata; `source` is a path, a `gguf.GGUFReader`, or a parsed
        `llama3.weights.gguf.GGUFFile` (its `metadata` dict)."""
        import gguf

        if hasattr(source, "metadata"):  # GGUFFile: metadata already parsed into Python values
            fields, where = source.metadata, str(source.path)
        else:
            reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
            fields = {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}
            where = str(getattr(reader.data, "filename", None) or source)
        missing = object()

        def field(key, default=missing):
            if key not in fields:
                if default is missing:
                    raise TokenizerError(f"{where}: GGUF metadata has no {key!r}")
                return default
            return fields[key]

        if (model := field("tokenizer.ggml.model")) != "gpt2":
            raise TokenizerError(f"{where}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is read")
        pre = field("tokenizer.ggml.pre", None)
        if pre not in GGUF_PRE_TOKENIZERS:
            known = ", ".join(sorted(GGUF_PRE_TOKENIZERS))
            raise TokenizerError(f"{where}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r} (known: {known})")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
        special_types = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
        merges = [_split_merge(m, where) for m in field("tokenizer.ggml.merges")]
        eos_id = field("tokenizer.ggml.eos_token_id", None)
        ends = {field(f"tokenizer.ggml.{k}_token_id", None) for k in ("eot", "eom")} - {None}
        tokenizer = cls(
            tokens,
            merges,
            GGUF_PRE_TOKENIZERS[pre],
            special={i for i, t in enumerate(types) if t in special_types},
            always_matched={i for i, t in enumerate(types) if t == gguf.TokenType.USER_DEFINED},
            bos_id=field("tokenizer.ggml.bos_token_id", None),
            eos_id=eos_id,
            pad_id=field("tokenizer.ggml.padding_token_id", None),
            add_bos=bool(field("tokenizer.ggml.add_bos_token", pre in GGUF_PRE_TOKENIZERS_ADDING_BOS)),
            chat_template=field("tokenizer.chat_template", None),
            source=where,
        )
        tokenizer.stop_ids |= ends
        return tokenizer

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> BPETokenizer:
        """From a Hugging Face `tokenizer.json` (model type BPE, byte-level); bos/eos/pad names and the chat
        template come from the `tokenizer_config.json` (and `chat_template.jinja`) beside it, when there is one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read tokenizer.json: {e}") from None
        model = data.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
            raise TokenizerError(f"{path}: model must be a byte-level BPE (type BPE, no byte_fallback or prefix)")
        if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
            raise TokenizerError(f"{path}: model needs a 'vocab' object and a 'merges' list")
        if data.get("normalizer") is not None:
            raise TokenizerError(f"{path}: normalizer {data['normalizer'].get('type')!r} is not supported")
        pattern = _pattern_of(data.get("pre_tokenizer"), path)
        added = {t["id"]: t for t in data.get("added_tokens", [])}
        by_id = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
        tokens = [by_id.get(i) for i in range(max(by_id) + 1)]
        merges = [_split_merge(m, path) if isinstance(m, str) else tuple(m) for m in model["merges"]]

        config_path = path.with_name("tokenizer_config.json")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_path}: not valid JSON: {e}") from None
        id_of = {t: i for i, t in enumerate(tokens) if t is not None}

        def token_id(key):
            name = config.get(key)
            name = name.get("content") if isinstance(name, dict) else name
            return id_of.get(name)

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if template is None and (template_path := path.with_name("chat_template.jinja")).is_file():
            template = template_path.read_text(encoding="utf-8")
        bos_id = token_id("bos_token")
        return cls(
            tokens,
            merges,
            pattern,
            special={i for i, t in added.items() if t.get("special")},
            always_matched={i for i, t in added.items() if not t.get("special")},
            bos_id=bos_id,
            eos_id=token_id("eos_token"),
            pad_id=token_id("pad_token"),
            add_bos=config.get("add_bos_token", bos_id is not None and _template_adds(data, tokens[bos_id])),
            chat_template=template,
            source=str(path),
        )


def _split_merge(merge: str, where) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2:
        raise TokenizerError(f"{where}: merge {merge!r} is not two tokens separated by one space")
    return parts[0], parts[1]


def _pattern_of(pre_tokenizer: dict | None, where) -> str:
    """The one regex that does what a tokenizer.json pre_tokenizer does, for the byte-level BPE shapes in use."""
    if not pre_tokenizer:
        raise TokenizerError(f"{where}: no pre_tokenizer; a byte-level BPE needs one")
    shape = []  # the steps, in order: "gpt2" (ByteLevel's own regex), "digits", or a Split regex
    for step in pre_tokenizer.get("pretokenizers", [pre_tokenizer]):
        kind, regex = step.get("type"), (step.get("pattern") or {}).get("Regex")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            shape += ["gpt2"] if step.get("use_regex", True) else []
        elif kind == "Split" and regex and step.get("behavior") == "Isolated" and not step.get("invert"):
            shape.append(regex)
        elif kind == "Digits" and step.get("individual_digits"):
            shape.append("digits")
        else:
            raise TokenizerError(f"{where}: pre_tokenizer step {json.dumps(step)} is not supported")
    if shape == ["gpt2"]:
        return GPT2_PATTERN
    if shape == ["digits", "gpt2"]:
        return DIGITS_GPT2_PATTERN
    if len(shape) == 1 and shape[0] not in ("digits", "gpt2"):
        return shape[0]
    raise TokenizerError(f"{where}: pre_tokenizer {json.dumps(pre_tokenizer)} is not supported")


def _template_adds(data: dict, bos_token: str) -> bool:
    """Whether the tokenizer.json post-processor puts the bos token first (as Llama 3's does)."""
    processors = data.get("post_processor") or {}
    for processor in processors.get("processors", [processors]):
        single = processor.get("single") or [{}]
        if single[0].get("SpecialToken", {}).get("id") == bos_token:
            return True
    return False


class ChatFormat:
    """Meta's Llama 3 dialog encoding:
    `<|begin_of_text|>` + per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
    then an open assistant header for the model to complete. Content is encoded as given, as Meta's
    `llama_models` does (Hugging Face's template strips it).

    With tools (OpenAI function definitions), Llama 3.1's tool format (llama3/tools.py): the system prompt names
    the environment and built-in tools, custom tools go into the first user message, an assistant message with
    tool calls carries them as the model writes them and ends in `<|eom_id|>`, and "tool" messages are sent as
    `ipython`. The ids equal those of Meta's ChatFormat for the same messages."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.start_header_id = tokenizer.special_tokens["<|start_header_id|>"]
        self.end_header_id = tokenizer.special_tokens["<|end_header_id|>"]

    def encode_header(self, message: dict) -> list[int]:
        role = "ipython" if message["role"] == "tool" else message["role"]  # tool results go under "ipython"
        role_ids = self.tokenizer.encode(role)
        return [self.start_header_id, *role_ids, self.end_header_id, *self.tokenizer.encode("\n\n")]

    def encode_message(self, message: dict) -> list[int]:
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise TokenizerError(f"message content must be a string, got {type(content).__name__}")
        calls = message.get("tool_calls") or [] if message["role"] == "assistant" else []
        ids = self.encode_header(message)
        if calls and calls[0]["function"]["name"] == "code_interpreter":
            ids.append(self.tokenizer.special_tokens[PYTHON_TAG])
        ids += self.tokenizer.encode(content)
        for call in calls:  # Meta's encoder writes several calls one after the other
            ids += self.tokenizer.encode(llama31_call_text(call))
        return ids + [self.tokenizer.eom_id if calls else self.tokenizer.eot_id]  # eom: the calls were pending

    def encode_dialog_prompt(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                             today: date | None = None) -> list[int]:
        """`today` dates a tool-using system prompt (default: today)."""
        if tools:
            messages = self.with_tools(messages, tools, today)
        ids = [self.tokenizer.bos_id]
        for message in messages:
            ids += self.encode_message(message)
        return ids + self.encode_header({"role": "assistant"})

    @staticmethod
    def with_tools(messages: Sequence[dict], tool_list: Sequence[dict], today: date | None = None) -> list[dict]:
        """The dialog with Llama 3.1's tool prompts put in: the system prompt and the first user message."""
        messages = list(messages)
        system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
        messages.insert(0, {"role": "system", "content": llama31_system_prompt(system, list(tool_list), today)})
        custom = [t for t in tool_list if tool_function(t)["name"] not in BUILTIN_TOOLS]
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if custom and first_user is not None:
            m = messages[first_user]
            messages[first_user] = {**m, "content": llama31_tools_message(custom, m.get("content") or "")}
        return messages


class TemplateChatFormat:
    """A Jinja chat template (as shipped in GGUF metadata or tokenizer_config.json), rendered with the settings
    Hugging Face transformers uses, then encoded with special tokens allowed.

    Tools go to the template as `tools` and earlier calls' arguments as dicts, as transformers'
    `apply_chat_template` passes them; a template that never mentions `tools` gets them described in the system
    message instead (llama3/tools.py), or it would not know they exist."""

    def __init__(self, tokenizer, template: str, bos_token: str = "", eos_token: str = ""):
        self.tokenizer, self.bos_token, self.eos_token = tokenizer, bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
            self.knows_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template, line {e.lineno}: {e.message}") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               tools: Sequence[dict] | None = None) -> str:
        if self.knows_tools:
            messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": call_arguments(c)}}
                                             for c in m["tool_calls"]]} if m.get("tool_calls") else m
                        for m in messages]
        else:
            messages, tools = generic_tool_messages(list(messages), tools), None
        try:
            return self.template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None

    def encode_dialog_prompt(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        return self.tokenizer.encode(self.render(messages, tools=tools), allowed_special="all")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str):
    raise TokenizerError(f"chat template: {message}")


def chat_format_for(tokenizer, template: str | None = None) -> ChatFormat | TemplateChatFormat:
    """Meta's ChatFormat for the Llama 3 tokenizer; otherwise (or when a template is given) the chat template."""
    if template is None and isinstance(tokenizer, Tokenizer):
        return ChatFormat(tokenizer)
    template = template or tokenizer.chat_template
    if template is None:
        raise TokenizerError("the tokenizer has no chat template; pass one")
    return TemplateChatFormat(tokenizer, template, tokenizer.bos_token, tokenizer.eos_token)
