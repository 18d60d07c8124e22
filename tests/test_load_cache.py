"""The cache of converted GGUF loads: a second load memory-maps exactly what the first one built; a changed file or
a damaged entry is converted again, never used."""

import logging

import gguf
import pytest
import torch

import llama3
import llama3.llama
from llama3.tokenizer import byte_to_unicode

from conftest import random_model, tiny_args, write_gguf

PROMPT = "the theme of these tests"


def byte_level_tokenizer() -> dict:
    """A small byte-level BPE vocabulary (the 256 bytes, a few merges, one control token) as GGUF fields."""
    chars = list(byte_to_unicode().values())
    merges = ["t h", "th e", "Ġ t", "Ġt he", "e s", "Ġ th"]
    tokens = chars + [m.replace(" ", "") for m in merges] + ["<|eot_id|>"]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    return {"pre": "llama-bpe", "tokens": tokens, "types": types, "merges": merges, "bos": len(tokens) - 1,
            "eos": len(tokens) - 1, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA3_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_file(path, qtype: str, seed: int = 0, tied: bool = True):
    tokenizer = byte_level_tokenizer()
    args = tiny_args(vocab_size=len(tokenizer["tokens"]) + 5, tie_embeddings=tied)  # a few unused ids
    tokenizer["tokens"] += [f"<unused{i}>" for i in range(5)]
    tokenizer["types"] += [gguf.TokenType.UNUSED] * 5
    return write_gguf(path, args, random_model(args, seed).state_dict(), gguf.GGMLQuantizationType[qtype], tokenizer)


def tensors(llm) -> dict[str, torch.Tensor]:
    m = llm.model
    return {**dict(m.named_buffers(remove_duplicate=False)), **dict(m.named_parameters(remove_duplicate=False))}


def assert_same(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    ids = a.encode_prompt(PROMPT)
    assert ids == b.encode_prompt(PROMPT)
    assert a.generate(PROMPT, max_new_tokens=6) == b.generate(PROMPT, max_new_tokens=6)
    assert a.chat([{"role": "user", "content": "the"}], max_new_tokens=3) == \
        b.chat([{"role": "user", "content": "the"}], max_new_tokens=3)


def no_conversion(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("converted although a valid cache entry exists")
    monkeypatch.setattr(llama3.llama, "read_checkpoint", fail)


@pytest.mark.parametrize("qtype,quantize,tied", [("Q8_0", None, True), ("Q4_0", "int4", False),
                                                 ("Q8_0", "int8", True), ("F16", None, False)])
def test_a_second_load_is_the_first_ones_model_without_converting(tmp_path, home, monkeypatch, qtype, quantize,
                                                                   tied, one_thread):
    path = write_file(tmp_path / "m.gguf", qtype, tied=tied)
    first = llama3.load(path, quantize=quantize)
    assert len(list((home / "converted").iterdir())) == 1
    with monkeypatch.context() as m:
        no_conversion(m)
        second = llama3.load(path, quantize=quantize)
    assert_same(first, second)
    if tied:  # one matrix, as when converted
        assert second.model.output.weight.data_ptr() == second.model.tok_embeddings.weight.data_ptr()
    uncached = llama3.load(path, quantize=quantize, cache=False)
    assert_same(uncached, second)


def test_other_options_get_their_own_entry(tmp_path, home, one_thread):
    path = write_file(tmp_path / "m.gguf", "Q4_0")
    llama3.load(path, quantize="int4")
    llama3.load(path, quantize="int8")
    llama3.load(path)
    assert len(list((home / "converted").iterdir())) == 3


def test_a_changed_file_is_converted_again(tmp_path, home, caplog, one_thread):
    path = write_file(tmp_path / "m.gguf", "Q8_0")
    llama3.load(path, quantize="int8")
    write_file(path, "Q8_0", seed=1)  # same size, other weights
    with caplog.at_level(logging.INFO, logger="llama3.weights"):
        changed = llama3.load(path, quantize="int8")
    assert "stale" in caplog.text
    assert_same(changed, llama3.load(path, quantize="int8", cache=False))


@pytest.mark.parametrize("damage", ["flip bytes", "truncate", "garbage entry"])
def test_a_damaged_entry_is_rebuilt_never_used(tmp_path, home, monkeypatch, caplog, damage, one_thread):
    path = write_file(tmp_path / "m.gguf", "Q4_0")
    reference = llama3.load(path, quantize="int4")
    (entry,) = (home / "converted").iterdir()
    data = bytearray((entry / "tensors.pt").read_bytes())
    if damage == "flip bytes":
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0x5A
        (entry / "tensors.pt").write_bytes(bytes(data))
    elif damage == "truncate":
        (entry / "tensors.pt").write_bytes(bytes(data[:len(data) // 2]))
    else:
        (entry / "entry.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="llama3.weights"):
        rebuilt = llama3.load(path, quantize="int4")
    assert "corrupt" in caplog.text and str(path) in caplog.text
    assert_same(reference, rebuilt)
    with monkeypatch.context() as m:  # the entry was written again, whole
        no_conversion(m)
        assert_same(reference, llama3.load(path, quantize="int4"))


def test_entries_of_deleted_files_are_removed(tmp_path, home, one_thread):
    gone, kept = write_file(tmp_path / "gone.gguf", "Q8_0"), write_file(tmp_path / "kept.gguf", "Q8_0")
    llama3.load(gone)
    gone.unlink()
    llama3.load(kept)
    (entry,) = (home / "converted").iterdir()
    assert str(kept) in (entry / "entry.json").read_text()
