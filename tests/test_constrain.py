"""Constrained decoding on tiny random models: whatever the weights say, the output obeys the grammar, with both
tokenizers, through the Python API, inside continuous batching (one request's mask leaves the others alone) and
with a quantized model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import random_model, tiny_args
from llama3.constrain import Constraint, ConstraintError, grammar_for, json_schema_grammar, tool_calls_grammar
from llama3.llama import Llama

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": -5, "maximum": 5},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "point": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
              "required": ["x"], "additionalProperties": False}},
    "required": ["name", "n", "tags", "point"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llama3_tokenizer():
    from llama3.tokenizer import Tokenizer
    return Tokenizer()


@pytest.fixture(scope="module")
def bpe_tokenizer(default_gguf_path):
    from llama3.tokenizer import BPETokenizer
    return BPETokenizer.from_gguf(default_gguf_path)


def tiny_llama(tokenizer, seed=0):
    model = random_model(tiny_args(vocab_size=tokenizer.vocab_size, max_seq_len=512), seed)
    return Llama(model, tokenizer, None, name="tiny")


@pytest.mark.parametrize("which", ["llama3_tokenizer", "bpe_tokenizer"])
def test_outputs_obey_schema_regex_and_grammar(request, which, one_thread):
    tokenizer = request.getfixturevalue(which)
    llm = tiny_llama(tokenizer)
    for text in llm.generate(["data:", "more:"], json_schema=SCHEMA, temperature=1.0, seed=1, max_new_tokens=120):
        jsonschema.validate(json.loads(text), SCHEMA)  # a batch: each row its own grammar state
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", llm.generate("id:", regex=r"[0-9]{3}-[a-z]{2}", temperature=1.0,
                                                          seed=1, max_new_tokens=20))
    lark = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[1-9]/'
    assert llm.generate(["q:", "r:"], grammar=lark, temperature=1.0, seed=2, max_new_tokens=10)[1] in \
        {"yes", "no", *(f"maybe {i}" for i in range(1, 10))}


def test_constraints_in_continuous_batching_are_per_request(bpe_tokenizer, one_thread):
    from llama3.generate import SamplingParams
    from llama3.serve.engine import Engine, Request
    llm = tiny_llama(bpe_tokenizer)
    engine = Engine(llm.model, bpe_tokenizer, max_batch=3, max_context=256)
    texts, prompt = {}, bpe_tokenizer.encode("hello there")

    def request(key, constraint=None, **kw):
        texts[key] = ""
        emit = lambda out: texts.__setitem__(key, texts[key] + out.text)  # noqa: E731
        return Request(prompt, max_tokens=60, emit=emit, constraint=constraint, **kw)

    grammar = json_schema_grammar(SCHEMA)
    reqs = [request("free"), request("json", Constraint(bpe_tokenizer, grammar), params=SamplingParams(1.0, seed=3)),
            request("digits", Constraint(bpe_tokenizer, grammar_for(regex=r"[0-9]{4}")))]
    engine.submit(reqs)
    while not all(r.finished for r in reqs):
        engine.step()
    jsonschema.validate(json.loads(texts["json"]), SCHEMA)
    assert re.fullmatch(r"[0-9]{4}", texts["digits"])
    assert texts["free"] == llm.complete_ids([prompt], max_new_tokens=60)[0]  # the masks touched no other row


def test_quantized_model(bpe_tokenizer, one_thread):
    from llama3.quantize import quantize_model
    llm = tiny_llama(bpe_tokenizer)
    quantized = Llama(quantize_model(llm.model, "int8"), bpe_tokenizer, None)
    text = quantized.generate("x", json_schema=SCHEMA, temperature=1.0, seed=5, max_new_tokens=120)
    jsonschema.validate(json.loads(text), SCHEMA)


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


def run(constraint, tokenizer, text):
    """Feed a reply token by token, checking each token is allowed; the text the constraint let through."""
    for token in tokenizer.encode(text):
        logits = torch.zeros(tokenizer.vocab_size)
        constraint.mask_(logits)
        if logits[token] == float("-inf"):
            return False
        constraint.accept(token)
    return True


def test_tool_call_grammar_strict_and_lazy(llama3_tokenizer):
    grammar = tool_calls_grammar(TOOLS, python_tag=True)
    assert run(Constraint(llama3_tokenizer, grammar), llama3_tokenizer, '{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert not run(Constraint(llama3_tokenizer, grammar), llama3_tokenizer, '{"name": "sub"')
    assert not run(Constraint(llama3_tokenizer, grammar), llama3_tokenizer,
                   '{"name": "add", "parameters": {"a": 1, "c": 2')  # closed to undeclared keys
    lazy = tool_calls_grammar(TOOLS, leading_space=True)
    words = Constraint(llama3_tokenizer, lazy, lazy=True)
    assert run(words, llama3_tokenizer, "Sure, 1 + 2 is 3. {not a call") and not words.active  # never triggered
    call = Constraint(llama3_tokenizer, lazy, lazy=True)
    assert run(call, llama3_tokenizer, ' {"name": "add",') and call.active  # a call began: constrained from here
    assert not run(call, llama3_tokenizer, '"oops"')


def test_bad_constraints_are_clear_errors(bpe_tokenizer):
    with pytest.raises(ConstraintError, match="one constraint"):
        grammar_for(json_schema=SCHEMA, regex="a+")
    with pytest.raises(ConstraintError):
        Constraint(bpe_tokenizer, json_schema_grammar({"type": "object", "properties": {"a": {"type": "nope"}}}))


@pytest.mark.parametrize("draft_seed", [0, 1])  # the target itself (all accepted) and another model (rejections)
def test_speculative_decoding_gives_the_constrained_target_output(bpe_tokenizer, draft_seed, one_thread):
    from llama3.generate import generate_tokens
    from llama3.speculative import SpeculativeDecoder
    llm = tiny_llama(bpe_tokenizer)
    draft = random_model(tiny_args(vocab_size=bpe_tokenizer.vocab_size, max_seq_len=512), draft_seed)
    prompt, grammar = bpe_tokenizer.encode("data:"), json_schema_grammar(SCHEMA)
    plain = [t for (t,) in generate_tokens(llm.model, [prompt], max_new_tokens=100, stop_ids=bpe_tokenizer.stop_ids,
                                           constraints=[Constraint(bpe_tokenizer, grammar)]) if t is not None]
    decoder = SpeculativeDecoder(llm.model, draft, k=3)
    fast = list(decoder.generate(prompt, max_new_tokens=100, stop_ids=bpe_tokenizer.stop_ids,
                                 constraint=Constraint(bpe_tokenizer, grammar)))
    assert fast == plain
    jsonschema.validate(json.loads(bpe_tokenizer.decode([t for t in fast if t not in bpe_tokenizer.stop_ids])), SCHEMA)
    assert (decoder.accepted == decoder.proposed) == (draft_seed == 0)
