"""Tokenizers against their references: Meta's `llama_models` for Llama 3; Hugging Face transformers / tokenizers and
llama.cpp's pre-tokenizer rules for byte-level BPE vocabularies (the default model's GGUF, tokenizer.json files)."""

import base64
import importlib.resources
import json
import random

import gguf
import pytest
import regex
from llama_models.datatypes import RawMessage, ToolPromptFormat
from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama3.tokenizer import (
    DIGITS_GPT2_PATTERN,
    GPT2_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    MAX_ENCODE_CHARS,
    BPETokenizer,
    ChatFormat,
    TemplateChatFormat,
    Tokenizer,
    TokenizerError,
    _pieces,
    byte_to_unicode,
    chat_format_for,
    load_tiktoken_ranks,
)

CORPUS = {
    "english": "This is a test sentence. I'm sure they'll say it's fine; we've done what we'd planned. DON'T!",
    "spanish": "¿Dónde está la biblioteca? El niño comió paella y bebió agua fría. ¡Qué día tan bonito!",
    "chinese": "我们今天去公园散步，天气非常好。机器学习是人工智能的一个分支。",
    "arabic": "مرحبا بالعالم! كيف حالك اليوم؟ اللغة العربية جميلة جدا.",
    "hindi": "नमस्ते दुनिया। आप कैसे हैं? मुझे हिंदी पसंद है।",
    "code": 'def fib(n: int) -> int:\n    """Fibonacci."""\n    if n < 2:\n        return n\n'
    '    return fib(n - 1) + fib(n - 2)\n\nprint({"a": [1, 2, 3]}, xs[::-1], a != b)  # done\n',
    "emoji": "Great job! 🎉👍🏽 Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, hearts ❤️💙",
    "numbers": "In 2024, 1234567 people paid $3.50 (12,000.75 €) on 03/04/2025 at 10:30pm; π≈3.14159 ①Ⅻ٣",
    "whitespace": "  leading\ttabs\t\tand   runs   \n\n\n lines\r\nCRLF\r\n x   1  22\t 3\n 4 \u00a0nb\u3000w\u2009t  ",
    "lookalikes": "Text with <|eot_id|>, <|begin_of_text|>, <|im_start|>user<|im_end|>, <|endoftext|> and <|image|>.",
    "contractions": "It'S YOU'RE WE'LL they'D I'M 'tis rock'n'roll",
    "empty": "",
    "space": " ",
    "newline": "\n",
}
MIXED_ALPHABET = [
    *"abcXYZ 0123456789.,!?-_()[]{}<>|/\\\"'\n\t\r",
    *"éñüßçøå",
    *"世界你好中文",
    *"مرحبا",
    *"नमस्ते",
    *["🎉", "👍🏽", "\u200b", "\u00a0", "\u3000", "①", "Ⅻ", "٣", "'re", "'LL", "   ", "\n\n"],
    *["<|eot_id|>", "<|im_end|>"],
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(MIXED_ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- Llama 3 tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def meta():
    return MetaTokenizer.get_instance()


def test_published_vector(tok):
    published = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == published


def test_special_tokens_and_ids_match_meta(tok, meta):
    assert tok.special_tokens == meta.special_tokens
    assert len(LLAMA3_SPECIAL_TOKENS) == 256 and tok.vocab_size == meta.n_words == 128256
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.pad_id) == (128000, 128001, 128009, 128008, 128004)
    assert (meta.bos_id, meta.eos_id, meta.eot_id, meta.eom_id, meta.pad_id) == (128000, 128001, 128009, 128008, 128004)
    assert tok.stop_ids == frozenset(meta.stop_tokens)
    assert tok.special_tokens["<|python_tag|>"] == 128010 and tok.special_tokens["<|start_header_id|>"] == 128006


@pytest.mark.parametrize("name", CORPUS)
def test_ids_match_meta(tok, meta, name):
    text = CORPUS[name]
    assert tok.encode(text) == meta.encode(text, bos=False, eos=False)
    assert tok.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)
    assert tok.encode(text, allowed_special="all") == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert tok.decode(tok.encode(text)) == text


def test_random_text_matches_meta(tok, meta):
    for text in random_texts(300):
        assert tok.encode(text) == meta.encode(text, bos=False, eos=False), text
        assert tok.decode(tok.encode(text)) == text


LONG_TEXTS = {
    "30k_one_char": "a" * 30_000,
    "30k_spaces": " " * 30_000,
    "runs_around_the_limit": "x" * 25_000 + " " * 25_001 + "y" * 50_001 + "\n" * 3 + "z",
    "60k_newlines_then_text": "\n" * 60_000 + "end",
    "450k_chars": (" ".join(CORPUS.values()) * 1000)[:450_000],
    "450k_chars_cut_mid_word": "Hello world, " * 35_000,  # Meta's 400k cut falls inside "Hello"
}


@pytest.mark.parametrize("name", LONG_TEXTS)
def test_long_inputs_match_meta(tok, meta, name):
    text = LONG_TEXTS[name]
    assert tok.encode(text) == meta.encode(text, bos=False, eos=False)
    assert tok.decode(tok.encode(text)) == text
    if len(text) <= MAX_ENCODE_CHARS:  # the same cut points as Meta's character loop
        assert list(_pieces(text, MAX_ENCODE_CHARS)) == list(meta._split_whitespaces_or_nonwhitespaces(text, 25_000))


def test_special_token_text_is_plain_text_unless_allowed(tok):
    text = "a<|eot_id|>b"
    plain = tok.encode(text)
    assert all(i < 128000 for i in plain) and tok.decode(plain) == text
    assert tok.encode(text, allowed_special={"<|eot_id|>"}) == [*tok.encode("a"), tok.eot_id, *tok.encode("b")]
    assert tok.encode(text, allowed_special="all") == tok.encode(text, allowed_special={"<|eot_id|>"})
    assert tok.encode("a<|python_tag|>", allowed_special={"<|eot_id|>"}) == tok.encode("a<|python_tag|>")
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(text, disallowed_special="all")
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(text, disallowed_special={"<|eot_id|>"})
    assert tok.decode([tok.eot_id]) == "<|eot_id|>"


def test_decode_of_a_partial_character_uses_replacement(tok):
    ids = tok.encode("𠜎")  # a rare CJK character: several byte-level tokens
    assert len(ids) > 1
    assert tok.decode(ids) == "𠜎" and "\ufffd" in tok.decode(ids[:1])


def test_tokenizer_model_from_a_path(tok, tmp_path):
    with importlib.resources.as_file(importlib.resources.files("llama_models.llama3") / "tokenizer.model") as path:
        assert Tokenizer(path).encode(CORPUS["spanish"]) == tok.encode(CORPUS["spanish"])
    # A tiny tiktoken file: the 256 bytes, then "ab"; special tokens are numbered after the ranks.
    tokens = [bytes([b]) for b in range(256)] + [b"ab"]
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tokens)]
    (tmp_path / "tokenizer.model").write_text("".join(lines))
    tiny = Tokenizer(tmp_path / "tokenizer.model")
    assert tiny.encode("abc", bos=True) == [257, 256, ord("c")]
    assert tiny.vocab_size == 257 + 256 and tiny.eot_id == 257 + 9


def test_bad_tokenizer_model_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match="bad.model: line 2"):
        Tokenizer(tmp_path / "bad.model")
    with pytest.raises(TokenizerError, match="ranks are not"):
        load_tiktoken_ranks(b"IQ== 0\nIg== 5\n", "gaps.model")


# ---------------------------------------------------------------------------------------------- Llama 3 chat format

DIALOGS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "¿Qué hora es? 我们 🎉"},
        {"role": "assistant", "content": "  It is 10:30.\n"},
    ],
    [
        {"role": "user", "content": "Run it"},
        {"role": "assistant", "content": "print(2 + 2)"},
        {"role": "ipython", "content": "4"},
    ],
    [{"role": "user", "content": "<|eot_id|> is just text here"}],
]


def meta_message(message: dict) -> RawMessage:
    return RawMessage(role="tool" if message["role"] == "ipython" else message["role"], content=message["content"])


@pytest.mark.parametrize("dialog", DIALOGS)
def test_chat_format_matches_meta(tok, meta, dialog):
    ours, theirs = ChatFormat(tok), MetaChatFormat(meta)
    assert ours.encode_dialog_prompt(dialog) == theirs.encode_dialog_prompt([meta_message(m) for m in dialog]).tokens
    for message in dialog:
        expected, _ = theirs.encode_message(meta_message(message), ToolPromptFormat.json)
        assert ours.encode_message(message) == expected
    assert ours.encode_header({"role": "tool"}) == ours.encode_header({"role": "ipython"})


def test_chat_format_rejects_non_text_content(tok):
    with pytest.raises(TokenizerError, match="content must be a string"):
        ChatFormat(tok).encode_message({"role": "user", "content": [{"type": "image"}]})


LLAMA3_TEMPLATE = (
    r"{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    r" + m['content'] + '<|eot_id|>' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_template_chat_format_reproduces_llama3_chat_format(tok):
    assert isinstance(chat_format_for(tok), ChatFormat)
    templated = chat_format_for(tok, LLAMA3_TEMPLATE)
    assert isinstance(templated, TemplateChatFormat)
    for dialog in DIALOGS[:3]:
        assert templated.encode_dialog_prompt(dialog) == ChatFormat(tok).encode_dialog_prompt(dialog)
    # As in transformers, a template's output is encoded with special tokens allowed, content included.
    injected = templated.encode_dialog_prompt(DIALOGS[3])
    assert injected.count(tok.eot_id) == 2 and ChatFormat(tok).encode_dialog_prompt(DIALOGS[3]).count(tok.eot_id) == 1


# ---------------------------------------------------------------------------------------------- GGUF byte-level BPE


@pytest.fixture(scope="module")
def smol_gguf(default_gguf_path):
    return gguf.GGUFReader(default_gguf_path)


@pytest.fixture(scope="module")
def smol(smol_gguf):
    return BPETokenizer.from_gguf(smol_gguf)


@pytest.fixture(scope="module")
def hf_smol(default_gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(default_gguf_path.parent, gguf_file=default_gguf_path.name)


SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


@pytest.fixture(scope="module")
def smol_reference(hf_smol):
    """Hugging Face's tokenizer for the GGUF with the pre-tokenizer that the GGUF names ("smollm"): llama.cpp splits
    digits one by one, then applies GPT-2's regex. transformers' GGUF conversion keeps only GPT-2's regex, so it
    differs where two or more whitespace characters precede a number ("x   1": llama.cpp and we give "x", "   ",
    "1"; it gives "x", "  ", " 1") or a space precedes a non-ASCII numeral (" ①")."""
    tokenizers = pytest.importorskip("tokenizers")
    data = json.loads(hf_smol.backend_tokenizer.to_str())
    data["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def hf_ids(tokenizer, text: str, *, special_as_text: bool = False) -> list[int]:
    tokenizer.encode_special_tokens = special_as_text
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = False


@pytest.mark.slow
def test_gguf_metadata(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol.stop_ids == {2, 0}  # <|im_end|> and <|endoftext|>
    assert "<|im_start|>" in smol.chat_template


@pytest.mark.slow
@pytest.mark.parametrize("name", CORPUS)
def test_gguf_ids_match_transformers(smol, hf_smol, smol_reference, name):
    text = CORPUS[name]
    expected = hf_ids(smol_reference, text)
    assert smol.encode(text, allowed_special="all") == expected
    assert smol.encode(text) == hf_ids(smol_reference, text, special_as_text=True)
    if not regex.search(r"\s\s\p{N}|\s(?![0-9])\p{N}", text):  # where transformers' GGUF conversion agrees
        assert hf_smol(text, add_special_tokens=False).input_ids == expected
    assert smol.decode(smol.encode(text)) == text


@pytest.mark.slow
def test_gguf_bpe_is_merge_order_bpe_on_whole_vocabulary(smol, smol_gguf):
    """tiktoken merges the adjacent pair whose concatenation ranks lowest; Hugging Face and llama.cpp merge the pair
    that comes first in the merge list. Check they agree on the merged tokens of the vocabulary, each encoded as text
    of its own: where a merge list is not what BPE training makes, they would differ here first."""
    fields = smol_gguf.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    id_of, rank = {t: i for i, t in enumerate(tokens)}, {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    to_byte = {c: b for b, c in byte_to_unicode().items()}

    def merge_order_bpe(word: str) -> list[int]:
        symbols = list(word)
        while len(symbols) > 1:
            best = min(range(len(symbols) - 1), key=lambda i: rank.get((symbols[i], symbols[i + 1]), len(rank)))
            if (symbols[best], symbols[best + 1]) not in rank:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        return [id_of[s] for s in symbols]

    checked = 0
    for merge in merges:
        word = merge.replace(" ", "")
        try:
            text = bytes(to_byte[c] for c in word).decode()
        except UnicodeDecodeError:  # part of a character: not text on its own
            continue
        if regex.findall(DIGITS_GPT2_PATTERN, text) == [text]:  # one piece for the pre-tokenizer
            assert smol.encode(text) == merge_order_bpe(word) == [id_of[word]], word
            checked += 1
    assert checked > 0.9 * len(merges)


@pytest.mark.slow
def test_gguf_random_text_matches_reference(smol, smol_reference):
    for text in random_texts(500, seed=1):
        assert smol.encode(text, allowed_special="all") == hf_ids(smol_reference, text), text


@pytest.mark.slow
def test_gguf_long_text_matches_reference(smol, smol_reference):
    text = (" ".join(CORPUS.values()) * 200)[:450_000]  # past Meta's 400k chunk, which only the Llama 3 tokenizer uses
    assert smol.encode(text) == hf_ids(smol_reference, text, special_as_text=True)


# Runs longer than Meta's 25k-character cut: byte-level BPE tokenizers encode them whole, as HF and llama.cpp do.
LONG_RUNS = {
    "30k_spaces": " " * 30_000,
    "30k_letters": "a" * 30_000,
    "text_30k_spaces_text": "x" + " " * 30_000 + "y",
    "30k_newlines": "\n" * 30_000 + "end",
    "runs_around_the_limit": "x" * 25_000 + " " * 25_001 + "y" * 50_001 + "\n" * 3 + "z",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LONG_RUNS)
def test_gguf_long_runs_match_reference(smol, smol_reference, name):
    assert smol.encode(LONG_RUNS[name]) == hf_ids(smol_reference, LONG_RUNS[name], special_as_text=True)


def llama_cpp_split(text: str) -> list[str]:
    """llama.cpp's "smollm" pre-tokenizer: split out every \\p{N}, then split the rest with GPT-2's regex (without
    its final \\s+); text that no regex matches stays a piece of its own."""

    def split(pieces, pattern):
        out = []
        for piece in pieces:
            start = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[start : m.start()], m.group()]
                start = m.end()
            out.append(piece[start:])
        return [p for p in out if p]

    return split(split([text], r"\p{N}"), r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")


def test_digits_pattern_is_llama_cpp_two_step_split():
    for text in [*CORPUS.values(), *random_texts(1000, seed=2), "x   1", "\t 1", "a \n 2b"]:
        assert regex.findall(DIGITS_GPT2_PATTERN, text) == llama_cpp_split(text), text


@pytest.mark.slow
def test_gguf_bytes_missing_from_vocabulary_are_dropped_like_llama_cpp(smol, smol_reference):
    # The vocabulary has no token for byte 0x04. llama.cpp keeps it as a symbol during BPE, so "!" and "!" stay
    # apart, then drops it; Hugging Face drops it first and merges "!!".
    bang = smol.encode("!")
    assert smol.encode("!\x04!") == bang + bang
    assert hf_ids(smol_reference, "!\x04!") == smol.encode("!!") != bang + bang


@pytest.mark.slow
def test_gguf_special_tokens(smol):
    text = "<|im_start|>user\nhi<|im_end|>"
    assert smol.encode(text, allowed_special="all") == [1, *smol.encode("user\nhi"), 2]
    assert 1 not in smol.encode(text) and smol.decode(smol.encode(text)) == text
    with pytest.raises(ValueError, match="disallowed special token"):
        smol.encode(text, disallowed_special="all")


@pytest.mark.slow
def test_gguf_partial_utf8_decode(smol):
    ids = smol.encode("𠜎")
    assert len(ids) > 1 and "\ufffd" in smol.decode(ids[:1]) and smol.decode(ids) == "𠜎"


@pytest.mark.slow
@pytest.mark.parametrize("with_system", [False, True])
def test_chat_template_matches_transformers(smol, hf_smol, with_system):
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris. ¿Algo más? 🎉"},
        {"role": "user", "content": "And of 日本?"},
    ]
    if with_system:
        messages.insert(0, {"role": "system", "content": "You are terse."})
    chat = chat_format_for(smol)
    assert isinstance(chat, TemplateChatFormat)
    assert chat.render(messages) == hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = hf_smol.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert chat.encode_dialog_prompt(messages) == expected


FEATURE_TEMPLATE = """{%- set sep = joiner(" | ") %}
{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'tool' %}{% continue %}{% endif %}
    {{ sep() }}<{{ m.role }}>{{ m.content | tojson }}
    {{ {"n": loop.index, "keys": ["a", "é"]} | tojson(indent=2) }}
    {% if loop.index >= 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}"""


@pytest.mark.slow
def test_template_features_match_transformers(smol, hf_smol):
    messages = [
        {"role": "system", "content": 'Say "hi"'},
        {"role": "tool", "content": "skipped"},
        {"role": "user", "content": "ünïcode\nline"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "after the break"},
    ]
    chat = TemplateChatFormat(smol, FEATURE_TEMPLATE, smol.bos_token, smol.eos_token)
    expected = hf_smol.apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert chat.render(messages) == expected


def test_template_errors(tok):
    strict = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
    )
    chat = TemplateChatFormat(tok, strict)
    with pytest.raises(TokenizerError, match="first message must be from the user"):
        chat.encode_dialog_prompt([{"role": "assistant", "content": "hi"}])
    with pytest.raises(TokenizerError, match="chat template, line 1"):
        TemplateChatFormat(tok, "{% for m in messages %}")
    with pytest.raises(TokenizerError, match="chat template: .*has no attribute .nope."):
        TemplateChatFormat(tok, "{{ messages[0].content.nope() }}").render([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------------- tokenizer.json


@pytest.mark.slow
@pytest.mark.parametrize("pre_tokenizer", ["as saved", "smollm"])
def test_tokenizer_json_saved_by_transformers(smol, hf_smol, tmp_path, pre_tokenizer):
    tokenizers = pytest.importorskip("tokenizers")
    hf_smol.save_pretrained(tmp_path)
    if pre_tokenizer == "smollm":
        data = json.loads((tmp_path / "tokenizer.json").read_text())
        data["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
        (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ours = BPETokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*CORPUS.values(), *random_texts(200, seed=3)]:
        assert ours.encode(text, allowed_special="all") == hf_ids(reference, text), text
        assert ours.encode(text) == hf_ids(reference, text, special_as_text=True), text
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (smol.bos_id, smol.eos_id, smol.pad_id, 49152)
    assert ours.stop_ids == smol.stop_ids and ours.chat_template == smol.chat_template


ADDED_TOKEN_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}


@pytest.mark.parametrize("merge_form", ["strings", "pairs"])
def test_tiny_tokenizer_json(tmp_path, merge_form):
    tokenizers = pytest.importorskip("tokenizers")
    merges = [("a", "b"), ("ab", "c"), ("Ġ", "ab"), ("b", "c")]  # ids below are not in merge order
    data = {
        "version": "1.0",
        "added_tokens": [
            {"id": 8, "content": "<s>", "special": True, **ADDED_TOKEN_FLAGS},
            {"id": 9, "content": "<sep>", "special": False, **ADDED_TOKEN_FLAGS},
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "abc": 4, "ab": 5, "bc": 6, "Ġab": 7},
            "merges": [" ".join(m) for m in merges] if merge_form == "strings" else [list(m) for m in merges],
        },
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "<s>"}))
    ours = BPETokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["abc ab a", "bcab abcabc", " abc", "ab<sep>c", "<s>abc<s>", " a  b", ""]:
        assert ours.encode(text, allowed_special="all") == hf_ids(reference, text), text
    assert ours.encode(" abc bcab") == [3, 4, 3, 6, 5]
    assert ours.encode("ab<sep>c") == [5, 9, 2]  # not special: matched everywhere
    assert ours.encode("<s>a", bos=True) == [8, 0] and ours.stop_ids == {8}
    assert ours.decode([7, 9, 4]) == " ab<sep>abc"


@pytest.mark.slow
def test_llama3_tokenizer_json(tok, meta, tmp_path, llama3_hf_tokenizer):
    """A tokenizer.json like the one Hugging Face ships for meta-llama models, made by transformers' own converter
    from Meta's tokenizer.model: our BPE path gives Meta's ids."""
    hf = llama3_hf_tokenizer
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    ours = BPETokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.add_bos) == (128256, 128000, 128009, True)
    for text in [*CORPUS.values(), *random_texts(200, seed=4)]:
        assert ours.encode(text) == tok.encode(text), text
        assert ours.encode(text, allowed_special="all") == hf_ids(hf, text) == tok.encode(text, allowed_special="all")
    for name, text in LONG_RUNS.items():  # Meta's tiktoken cuts long runs, Hugging Face's BPE does not
        assert ours.encode(text) == hf_ids(hf, text), name


# ---------------------------------------------------------------------------------------------- bad input


def write_tokenizer_gguf(path, **overrides):
    """A GGUF file holding only tokenizer metadata: a tiny byte-level vocabulary."""
    fields = {
        "model": "gpt2",
        "pre": "gpt2",
        "tokens": ["<|end|>", "a", "b", "ab", "Ġ", "<x>"],
        "types": [gguf.TokenType.CONTROL, *[gguf.TokenType.NORMAL] * 4, gguf.TokenType.USER_DEFINED],
        "merges": ["a b"],
    } | overrides
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    if fields["merges"] is not None:
        writer.add_token_merges(fields["merges"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    if fields.get("add_bos") is not None:
        writer.add_add_bos_token(fields["add_bos"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf(tmp_path):
    tiny = BPETokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "tiny.gguf"))
    assert tiny.encode("ab<x>a b") == [3, 5, 1, 4, 2]  # user-defined tokens match everywhere
    assert tiny.encode("<|end|>ab", allowed_special="all") == [0, 3] and tiny.stop_ids == {0}
    assert chat_format_for(tiny, "{{ bos_token }}").encode_dialog_prompt([]) == [0]
    with pytest.raises(TokenizerError, match="no chat template"):
        chat_format_for(tiny)


@pytest.mark.parametrize("pre, add_bos, expected", [
    ("llama-bpe", None, True),  # early Llama 3 conversions have no add_bos_token: llama.cpp adds bos for llama-bpe
    ("llama-bpe", False, False),
    ("gpt2", None, False),
    ("smollm", True, True),
])
def test_gguf_bos_default_is_llama_cpps(tmp_path, pre, add_bos, expected):
    path = write_tokenizer_gguf(tmp_path / "t.gguf", pre=pre, add_bos=add_bos)
    assert BPETokenizer.from_gguf(path).add_bos is expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pre": "mystery"}, "unknown pre-tokenizer tokenizer.ggml.pre='mystery'"),
        ({"model": "llama"}, "only 'gpt2'"),
        ({"merges": None}, "no 'tokenizer.ggml.merges'"),
        ({"merges": ["a Ġ"]}, "missing from the vocabulary"),
        ({"merges": ["a b c"]}, "not two tokens"),
    ],
)
def test_bad_gguf_tokenizer(tmp_path, overrides, message):
    path = write_tokenizer_gguf(tmp_path / "bad.gguf", **overrides)
    with pytest.raises(TokenizerError, match=message):
        BPETokenizer.from_gguf(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read tokenizer.json"),
        (json.dumps({"model": {"type": "WordPiece"}}), "must be a byte-level BPE"),
        (json.dumps({"model": {"type": "BPE", "vocab": {}}}), "'merges' list"),
        (
            json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}}),
            "pre_tokenizer step",
        ),
    ],
)
def test_bad_tokenizer_json(tmp_path, content, message):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match=message):
        BPETokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")


def test_gpt2_pattern_is_byte_level_default():
    # ByteLevel(use_regex=True) splits with GPT-2's regex; check ours against tokenizers' own pre-tokenizer.
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    to_bytes = {c: b for b, c in byte_to_unicode().items()}
    for text in [*CORPUS.values(), *random_texts(300, seed=5)]:
        pieces = [bytes(to_bytes[c] for c in p).decode() for p, _ in byte_level.pre_tokenize_str(text)]
        assert regex.findall(GPT2_PATTERN, text) == pieces, text
