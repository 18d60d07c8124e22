"""The default model end to end: our GGUF loader + tokenizer + chat template against HF transformers on the same
file, and the CLI as a user runs it."""

import subprocess
import sys

import pytest
import torch

import llama3

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ours(default_gguf_path):
    return llama3.load(default_gguf_path)


@pytest.fixture(scope="module")
def exported(default_gguf_path, tmp_path_factory):
    """The default model converted to a layout, once per layout for the module."""
    from llama3.export import export
    folders = {}

    def folder(layout):
        if layout not in folders:
            folders[layout] = tmp_path_factory.mktemp(layout)
            export(default_gguf_path, folders[layout], to=layout)
        return folders[layout]
    return folder


@pytest.fixture(scope="module")
def hf(default_gguf_path):
    transformers = pytest.importorskip("transformers")
    kw = dict(gguf_file=default_gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_gguf_path.parent, dtype=torch.float32, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf_path.parent, **kw)
    return model.eval(), tok


def test_same_prompt_ids_and_greedy_tokens_as_hf_transformers(ours, hf):
    model, tok = hf
    for messages in (QUESTION, [{"role": "system", "content": "Be brief."}] + QUESTION):
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert ours.encode_chat(messages) == list(expected)
    prompt = ours.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt):].tolist()
        logits_diff = (ours.model(torch.tensor([prompt])) - model(torch.tensor([prompt])).logits).abs().max()
    from llama3.generate import generate_tokens
    greedy = [s[0] for s in generate_tokens(ours.model, [prompt], max_new_tokens=48,
                                            stop_ids=ours.tokenizer.stop_ids)]
    assert len(greedy) >= 32
    assert greedy == ref
    assert logits_diff <= 1e-3


def test_chat_answers_paris(ours):
    assert "Paris" in ours.chat(QUESTION, max_new_tokens=32)


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "llama3.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_cli_chat_reads_one_message_per_line(default_gguf_path):
    out = run_cli("chat", stdin="What is the capital of France?\nAnd of Italy?\n")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2 and "Paris" in lines[0] and "Rome" in out.stdout


def test_cli_generate(default_gguf_path):
    out = run_cli("generate", "--max-new-tokens", "8", "The capital of France is")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_cli_reports_bad_model_path_clearly(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    out = run_cli("generate", "--model", str(tmp_path / "broken.gguf"), "hi")
    assert out.returncode == 2
    assert "broken.gguf" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_converted_default_model_chats_the_same(ours, exported, layout):
    again = llama3.load(exported(layout))
    assert again.encode_chat(QUESTION) == ours.encode_chat(QUESTION)
    assert again.tokenizer.encode("1234 héllo  wörld\n\n<|im_end|>") == ours.tokenizer.encode("1234 héllo  wörld\n\n<|im_end|>")
    prompt = torch.tensor([ours.encode_chat(QUESTION)])
    assert torch.equal(again.model(prompt), ours.model(prompt))


def test_converted_hf_tokenizer_reads_the_same_in_transformers(ours, exported):
    """The exported tokenizer files as transformers reads them: every special token keeps its id."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(exported("hf"))
    expected = hf.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert list(expected) == ours.encode_chat(QUESTION)
    text = "<|im_start|>user 1234 héllo  wörld\n\n<|im_end|>"
    assert hf.encode(text, add_special_tokens=False) == ours.tokenizer.encode(text, allowed_special="all")
