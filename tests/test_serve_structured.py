"""Tools, structured output, logprobs, penalties and embeddings through the official `openai` client against the
server on a free loopback port, with the default model; values checked against a direct forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from llama3.serve.app import BackgroundServer, ServeConfig, create_app

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                        "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(create_app(llm, ServeConfig(max_context=1024, max_batch=4))) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def streamed_reply(chunks):
    """Content, tool calls (as dicts) and finish reason, assembled from stream deltas as OpenAI's SDK users do."""
    content, calls, reason = "", {}, None
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(client, llm, stream):
    def ask(messages, max_tokens=64, **kw):
        args = dict(model=llm.name, messages=messages, tools=[WEATHER, TIME], max_tokens=max_tokens, temperature=0,
                    **kw)
        if not stream:
            r = client.chat.completions.create(**args)
            m = r.choices[0].message
            calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                     for c in m.tool_calls or []]
            return m.content or "", calls, r.choices[0].finish_reason
        return streamed_reply(client.chat.completions.create(**args, stream=True))

    content, calls, reason = ask(ASK, tool_choice="required")
    assert reason == "tool_calls" and content == "" and len(calls) >= 1
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    assert "paris" in json.loads(calls[0]["arguments"])["city"].lower()
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]}]
    history += [{"role": "tool", "tool_call_id": c["id"], "content": "18 degrees and sunny"} for c in calls]
    answer, more_calls, reason = ask(history, max_tokens=12, tool_choice="none")
    assert more_calls == [] and reason in ("stop", "length") and answer.strip()
    prompt = llm.encode_chat(history, [WEATHER, TIME])
    assert llm.tokenizer.decode(prompt).count("18 degrees and sunny") == len(calls)  # the result went back in
    assert answer == llm.tokenizer.decode(llm.tokenizer.encode(answer))  # plain text, no call syntax left
    if stream:  # the same calls streamed and not
        plain = client.chat.completions.create(model=llm.name, messages=ASK, tools=[WEATHER, TIME],
                                               tool_choice="required", max_tokens=64, temperature=0)
        assert [(c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls] == \
            [(c["name"], c["arguments"]) for c in calls]


def test_required_and_named_calls_are_schema_valid_when_sampled(client, llm):
    for seed in range(2):
        r = client.chat.completions.create(model=llm.name, messages=ASK, tools=[WEATHER, TIME], seed=seed,
                                           tool_choice="required", temperature=1.0, max_tokens=64)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls, r.choices[0]
        for c in calls:
            schema = {"get_weather": WEATHER, "get_time": TIME}[c.function.name]["function"]["parameters"]
            jsonschema.validate(json.loads(c.function.arguments), schema)
    r = client.chat.completions.create(model=llm.name, messages=ASK, tools=[WEATHER, TIME], temperature=1.0, seed=7,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=64)
    (call,) = r.choices[0].message.tool_calls  # a named tool: exactly one call
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "exclusiveMinimum": 0,
                                                                      "maximum": 5}},
        "required": ["x", "y"], "additionalProperties": False}, "ok": {"type": "boolean"}},
     "required": ["point", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
]
MORE_SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                      "country": {"type": "string", "maxLength": 15},
                                      "population": {"type": "integer", "minimum": 0}},
     "required": ["city", "country", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                      "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "maxItems": 3}}, "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1000}, "email": {"type": "string", "maxLength": 30}},
        "required": ["id"], "additionalProperties": False}, "active": {"type": "boolean"}},
     "required": ["user", "active"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 25},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "rating": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["title", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"ingredients": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "grams": {"type": "integer", "minimum": 1, "maximum": 500}},
        "required": ["name", "grams"], "additionalProperties": False}}},
     "required": ["ingredients"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"const": "ok"}, "code": {"type": "integer", "minimum": 200,
                                                                          "maximum": 599}},
     "required": ["status", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                      "lon": {"type": "number", "minimum": -180, "maximum": 180}},
     "required": ["lat", "lon"], "additionalProperties": False},
    {"type": "object", "properties": {"day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                                      "hours": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                           "maximum": 23}, "maxItems": 3}},
     "required": ["day", "hours"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["c"], "additionalProperties": False}},
        "required": ["b"], "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "nickname": {"type": ["string", "null"], "maxLength": 12}},
     "required": ["name", "nickname"], "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                                      "currency": {"enum": ["USD", "EUR", "JPY"]},
                                      "discount": {"type": "integer", "minimum": 0, "maximum": 90}},
     "required": ["price", "currency"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "minItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 20},
                                      "done": {"type": "boolean"},
                                      "priority": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["title", "done", "priority"], "additionalProperties": False},
    {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{2,8}$"},
                                      "length": {"type": "integer", "minimum": 2, "maximum": 8}},
     "required": ["word", "length"], "additionalProperties": False},
    {"type": "object", "properties": {"event": {"type": "string", "maxLength": 20},
                                      "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["event", "date"], "additionalProperties": False},
]


def check_schema(client, llm, schema, seed):
    r = client.chat.completions.create(
        model=llm.name, temperature=1.0, seed=seed, max_tokens=160,
        messages=[{"role": "user", "content": "Reply with an example JSON value."}],
        response_format={"type": "json_schema", "json_schema": {"name": "example", "schema": schema, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice  # the grammar ended the reply, not max_tokens
    jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(client, llm, i):
    check_schema(client, llm, SCHEMAS[i], seed=i)


@pytest.mark.long
@pytest.mark.parametrize("i", range(len(SCHEMAS + MORE_SCHEMAS)))
def test_json_schema_outputs_validate_on_twenty_schemas(client, llm, i):
    assert len(SCHEMAS + MORE_SCHEMAS) == 20
    check_schema(client, llm, (SCHEMAS + MORE_SCHEMAS)[i], seed=100 + i)


def test_json_object_and_bad_constraints(client, llm):
    r = client.chat.completions.create(model=llm.name, messages=[{"role": "user", "content": "A JSON object."}],
                                       response_format={"type": "json_object"}, temperature=1.0, seed=3,
                                       max_tokens=200)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    bad = [dict(tool_choice="required"),  # no tools
           dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
           dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
           dict(logprobs=True, top_logprobs=21)]
    for extra in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=llm.name, messages=ASK, max_tokens=4, **extra)


def forward_logprobs(llm, ids):
    with torch.inference_mode():
        return torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, vocab)


def ids_of(llm, token_bytes):
    index = {b: i for i, b in reversed(list(enumerate(llm.tokenizer.token_bytes)))}
    return [index[bytes(b)] for b in token_bytes]


def test_chat_logprobs_equal_a_forward_pass(client, llm):
    r = client.chat.completions.create(model=llm.name, messages=ASK, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=5)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    prompt = llm.encode_chat(ASK)
    generated = ids_of(llm, [e.bytes for e in entries])
    reference = forward_logprobs(llm, prompt + generated)[len(prompt) - 1:-1]
    for row, e in zip(reference, entries):
        top = row.topk(5)
        assert e.logprob == pytest.approx(top.values[0].item(), abs=1e-4)  # greedy: the most likely token
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert ids_of(llm, [t.bytes for t in e.top_logprobs]) == top.indices.tolist()


def test_completion_echo_logprobs_equal_a_forward_pass(client, llm):
    prompt = llm.encode_prompt("The capital of France is Paris, and the capital of Italy is")
    for max_tokens in (0, 3):
        r = client.completions.create(model=llm.name, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == len(prompt) + r.usage.completion_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert r.choices[0].text.startswith(llm.tokenizer.decode(prompt))
        assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
        reference = forward_logprobs(llm, prompt)
        expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist()
        assert lp.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)
        assert all(len(t) == 2 for t in lp.top_logprobs[1:])


def greedy_with_penalties(llm, prompt, n, frequency, presence):
    ids = list(prompt)
    for _ in range(n):
        with torch.inference_mode():
            logits = llm.model(torch.tensor([ids]))[0, -1].float()
        logits = logits.clone()  # outside inference mode: a tensor that may be changed in place
        generated = ids[len(prompt):]
        for t in set(generated):  # OpenAI: mu[j] -= c[j] * frequency + (c[j] > 0) * presence
            logits[t] -= generated.count(t) * frequency + presence
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_penalties_as_openai_defines_them(client, llm):
    prompt = llm.encode_prompt("List: apple, apple, apple, apple, apple,")
    plain = client.completions.create(model=llm.name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    r = client.completions.create(model=llm.name, prompt=prompt, max_tokens=6, temperature=0, frequency_penalty=1.5,
                                  presence_penalty=0.5, extra_body={"ignore_eos": True})
    expected = greedy_with_penalties(llm, prompt, 6, 1.5, 0.5)
    assert r.choices[0].text == llm.tokenizer.decode(expected) and r.choices[0].text != plain
    for extra in ({"repeat_penalty": 1.3}, {"min_p": 0.2}):  # llama-server's names, accepted and applied
        r = client.completions.create(model=llm.name, prompt=prompt, max_tokens=5, temperature=0, extra_body=extra)
        assert r.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=llm.name, prompt=prompt, max_tokens=5, extra_body={"min_p": 2})


def test_embeddings(client, llm):
    import base64

    import numpy as np
    r = client.embeddings.create(model=llm.name, input=["The cat sat.", "A dog ran."])
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == sum(
        len(llm.encode_prompt(t)) for t in ["The cat sat.", "A dog ran."])
    vectors = np.array([d.embedding for d in r.data])
    assert vectors.shape == (2, llm.args.dim)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1, 1], abs=1e-5)
    with torch.inference_mode():  # mean of the final-norm hidden states, L2-normalised
        h = {}
        handle = llm.model.norm.register_forward_hook(lambda m, a, out: h.setdefault("h", out))
        llm.model(torch.tensor([llm.encode_prompt("The cat sat.")]))
        handle.remove()
    expected = torch.nn.functional.normalize(h["h"][0].mean(0), dim=0).numpy()
    assert vectors[0] == pytest.approx(expected, abs=1e-5)
    raw = client.embeddings.create(model=llm.name, input="The cat sat.", encoding_format="base64")
    assert np.frombuffer(base64.b64decode(raw.data[0].embedding) if isinstance(raw.data[0].embedding, str)
                         else np.array(raw.data[0].embedding, dtype="<f4").tobytes(),
                         dtype="<f4") == pytest.approx(expected, abs=1e-5)


def test_tokenizer_routes(server, llm):
    import httpx
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert ids["tokens"] == llm.tokenizer.encode("Hello world")
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello world"
    assert httpx.get(server.url + "/tokenizer_info").json()["eos_token"] == llm.tokenizer.decode([llm.tokenizer.eos_id])


@pytest.mark.long
def test_lm_eval_local_completions_equals_llama3_eval(server, llm, tmp_path):
    """lm-eval's local-completions model scores an MMLU-layout task through /v1/completions (echo + logprobs)
    with the server's own tokens (/tokenize): the same accuracy and per-item scores as our evaluator in-process."""
    import shutil
    import textwrap

    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.models  # noqa: F401  (registers local-completions; importing our adapter first would hide it)
    from lm_eval.tasks import TaskManager
    from test_eval_lm_eval import YAML

    from llama3.eval.tasks import SAMPLES_DIR, EvalOptions, evaluate
    mmlu = tmp_path / "mmlu"
    for split in ("dev", "test"):
        (mmlu / "data" / split).mkdir(parents=True)
        shutil.copy(SAMPLES_DIR / "mmlu" / "data" / split / f"college_biology_{split}.csv", mmlu / "data" / split)
    (tmp_path / "mmlu.yaml").write_text(textwrap.dedent(YAML["mmlu"].format(root=mmlu)))
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["sample_mmlu_college_biology"], num_fewshot=0, log_samples=True,
        model_args={"model": llm.name, "base_url": server.url + "/v1/completions", "tokenizer_backend": "remote",
                    "max_length": 1024, "num_concurrent": 1},
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), bootstrap_iters=0)
    mine = evaluate(llm, f"mmlu:{mmlu}", options=EvalOptions(shots=0))
    assert out["results"]["sample_mmlu_college_biology"]["acc,none"] == pytest.approx(mine.metrics["acc"])
    samples = sorted(out["samples"]["sample_mmlu_college_biology"], key=lambda s: s["doc_id"])
    for theirs, ours in zip(samples, mine.samples, strict=True):
        assert [float(r[0]) for r in theirs["filtered_resps"]] == pytest.approx(ours["logprobs"], abs=1e-3)


@pytest.mark.long
def test_lm_eval_local_chat_completions_runs_a_generative_task(server, llm, tmp_path):
    """lm-eval's local-chat-completions model runs a generate_until task (GSM-8K layout) through
    /v1/chat/completions: each greedy reply equals our own chat on the same message, cut at the task's stop."""
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.models  # noqa: F401  (registers local-chat-completions)
    from lm_eval.tasks import TaskManager

    from llama3.eval.tasks import SAMPLES_DIR
    data = SAMPLES_DIR / "gsm8k" / "test.jsonl"
    (tmp_path / "gsm.yaml").write_text(
        "task: sample_gsm8k_chat\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{answer.split('####')[-1].strip()}}\"\n"
        "generation_kwargs:\n  until: [\"Question:\"]\n  max_gen_toks: 24\n  do_sample: false\n  temperature: 0.0\n"
        "metric_list:\n  - metric: exact_match\n")
    out = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["sample_gsm8k_chat"], limit=2, apply_chat_template=True,
        log_samples=True, bootstrap_iters=0,
        model_args={"model": llm.name, "base_url": server.url + "/v1/chat/completions", "num_concurrent": 1},
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert "exact_match,none" in out["results"]["sample_gsm8k_chat"]
    rows = [json.loads(line) for line in data.read_text().splitlines()[:2]]
    samples = sorted(out["samples"]["sample_gsm8k_chat"], key=lambda s: s["doc_id"])
    for row, sample in zip(rows, samples, strict=True):
        mine = llm.chat([{"role": "user", "content": f"Question: {row['question']}\nAnswer:"}],
                        max_new_tokens=24, stop=["Question:"])
        assert sample["resps"][0][0] == mine and mine.strip()
