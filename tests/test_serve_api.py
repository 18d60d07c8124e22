"""The HTTP server on loopback with the default model: the official `openai` client against it, 16 concurrent
streams, a corpus of bad requests, disconnects, limits, auth, health and metrics. Every call is bounded by a
timeout."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llama3.hub import DEFAULT_MODEL
from llama3.serve.app import BackgroundServer, ServeConfig, create_app

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "sk-test-key"
CONTEXT = 512  # a short context keeps the KV cache small and "prompt over the context" cheap to send


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


def start(llm, **config) -> BackgroundServer:
    return BackgroundServer(create_app(llm, ServeConfig(**{"max_context": CONTEXT, **config})))


@pytest.fixture(scope="module")
def server(llm):
    with start(llm, max_batch=8, max_queue=16, max_body_bytes=64 * 1024) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def engine_of(server):
    return server.server.config.app.state.engine


@contextlib.contextmanager
def slowed(engine, seconds_per_step: float):
    """Make every forward pass take a while, so that a request is surely still running when the test acts."""
    model = engine.model

    def slow(*args, **kwargs):
        time.sleep(seconds_per_step)
        return model(*args, **kwargs)

    engine.model = slow
    try:
        yield
    finally:
        engine.model = model


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"}]


# ---- the openai client -------------------------------------------------------------------------------------------

def test_models(client, llm):
    assert [m.id for m in client.models.list().data] == [llm.name]
    assert client.models.retrieve(llm.name).id == llm.name


def test_chat_completion(client, llm):
    r = client.chat.completions.create(model=llm.name, messages=CHAT, max_tokens=24, temperature=0)
    expected = llm.chat(CHAT, max_new_tokens=24)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected and "Paris" in expected
    assert r.choices[0].finish_reason == "stop"  # the model ended its turn
    assert r.usage.prompt_tokens == len(llm.encode_chat(CHAT))
    assert r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream(client, llm):
    chunks = list(client.chat.completions.create(model=llm.name, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == llm.chat(CHAT, max_new_tokens=24)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # it really streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(llm.encode_chat(CHAT))


def test_completion_and_stream_agree(client, llm):
    r = client.completions.create(model=llm.name, prompt="once upon a time", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=llm.name, prompt="once upon a time", max_tokens=10, temperature=0, stream=True))
    assert r.choices[0].text == streamed == llm.generate("once upon a time", max_new_tokens=10)
    assert r.object == "text_completion"


def test_max_tokens_gives_length(client, llm):
    r = client.completions.create(model=llm.name, prompt="abc", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 7)


def test_stop_strings(client, llm):
    full = client.completions.create(model=llm.name, prompt="stop here", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[12:14]
    for stream in (False, True):
        kwargs = dict(model=llm.name, prompt="stop here", max_tokens=30, temperature=0, stop=[stop, "zzzzz"],
                      stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(**kwargs))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            r = client.completions.create(**kwargs)
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (full[:full.index(stop)], "stop")


def test_streamed_utf8_is_whole_characters(client, llm):
    kwargs = dict(model=llm.name, prompt="Les élèves français écrivent «", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True)]
    assert "".join(pieces) == whole == llm.generate(kwargs["prompt"], max_new_tokens=24)
    assert any(ord(ch) > 127 for ch in whole) and "\ufffd" not in whole


def test_n_choices_and_seeds(client, llm):
    kwargs = dict(model=llm.name, messages=CHAT, max_tokens=8, temperature=1.0, seed=7, n=3)
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # the same seed gives the same choices
    assert len(set(texts)) > 1  # choice i samples with seed + i
    streamed = {}
    for c in client.chat.completions.create(**kwargs, stream=True):
        streamed[c.choices[0].index] = streamed.get(c.choices[0].index, "") + (c.choices[0].delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_sixteen_concurrent_streams_match_single_requests(server, llm):
    prompts = [f"Here is fact number {i + 1} about {topic}:" for i, topic in enumerate(
        ["the sea", "owls", "Paris", "volcanoes", "bread", "trains", "the moon", "bees", "ice", "rivers", "chess",
         "copper", "tea", "comets", "maps", "wind"])]

    def run(prompt):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        chunks = c.completions.create(model=llm.name, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                      stream_options={"include_usage": True})
        chunks = list(chunks)
        return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage.completion_tokens

    alone = [run(p) for p in prompts]
    engine = engine_of(server)
    batches_before = engine.metrics.batch_size.count
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone
    assert all(n >= 1 for _, n in together)
    # They really were decoded together: some forward passes carried several requests.
    assert engine.metrics.batch_size.count - batches_before < sum(n for _, n in together)


# ---- bad input -------------------------------------------------------------------------------------------------

def body(**fields) -> bytes:
    return json.dumps({"model": DEFAULT_MODEL, **fields}).encode()


M = DEFAULT_MODEL.encode()
MSG = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = {
    "malformed JSON": ("/v1/chat/completions", b'{"model": "%s", "messages": [' % M, 400),
    "not an object": ("/v1/chat/completions", b"[1, 2, 3]", 400),
    "empty body": ("/v1/completions", b"", 400),
    "deep nesting": ("/v1/completions", b"[" * 100000 + b"]" * 100000, 413),
    "deep nesting, small": ("/v1/completions", b"[" * 20000 + b"]" * 20000, 400),
    "invalid UTF-8": ("/v1/completions", b'{"model": "%s", "prompt": "\xff\xfe abc"}' % M, 400),
    "lone surrogate": ("/v1/completions", b'{"model": "%s", "prompt": "\\ud800"}' % M, 400),
    "missing model": ("/v1/chat/completions", json.dumps({"messages": MSG}).encode(), 400),
    "missing messages": ("/v1/chat/completions", body(), 400),
    "missing prompt": ("/v1/completions", body(), 400),
    "empty messages": ("/v1/chat/completions", body(messages=[]), 400),
    "messages not a list": ("/v1/chat/completions", body(messages="hi"), 400),
    "unknown role": ("/v1/chat/completions", body(messages=[{"role": "robot", "content": "hi"}]), 400),
    "content a number": ("/v1/chat/completions", body(messages=[{"role": "user", "content": 5}]), 400),
    "image content": ("/v1/chat/completions", body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
    "max_tokens a string": ("/v1/chat/completions", body(messages=MSG, max_tokens="5"), 400),
    "max_tokens negative": ("/v1/chat/completions", body(messages=MSG, max_tokens=-1), 400),
    "max_tokens zero": ("/v1/completions", body(prompt="a", max_tokens=0), 400),
    "max_tokens huge": ("/v1/completions", body(prompt="a", max_tokens=10**12), 400),
    "max_tokens float": ("/v1/completions", body(prompt="a", max_tokens=5.5), 400),
    "temperature a string": ("/v1/completions", body(prompt="a", temperature="hot"), 400),
    "temperature negative": ("/v1/completions", body(prompt="a", temperature=-1), 400),
    "temperature NaN": ("/v1/completions", b'{"model": "%s", "prompt": "a", "temperature": NaN}' % M, 400),
    "top_p zero": ("/v1/completions", body(prompt="a", top_p=0), 400),
    "stream a string": ("/v1/completions", body(prompt="a", stream="yes"), 400),
    "stop a number": ("/v1/completions", body(prompt="a", stop=5), 400),
    "five stops": ("/v1/completions", body(prompt="a", stop=list("abcde")), 400),
    "n zero": ("/v1/completions", body(prompt="a", n=0), 400),
    "n too large": ("/v1/completions", body(prompt="a", n=100), 400),
    "seed negative": ("/v1/completions", body(prompt="a", seed=-3), 400),
    "unknown model": ("/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": MSG}).encode(), 404),
    "prompt over the context": ("/v1/completions", body(prompt="hello " * 600), 400),
    "prompt + max_tokens over the context": ("/v1/completions", body(prompt="hello " * 300, max_tokens=300), 400),
    "empty prompt list": ("/v1/completions", body(prompt=[]), 400),
    "token id out of range": ("/v1/completions", body(prompt=[1, 2, 10**6]), 400),
    "unsupported logit_bias": ("/v1/completions", body(prompt="a", logit_bias={"1": 5}), 400),
    "logprobs out of range": ("/v1/completions", body(prompt="a", logprobs=21), 400),
    "tool without a function": ("/v1/chat/completions", body(messages=MSG, tools=[{"type": "function"}]), 400),
    "oversized body": ("/v1/completions", body(prompt="a" * 100_000), 413),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_a_clean_error(server, case):
    path, content, status = BAD_REQUESTS[case]
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and set(error) == {"message", "type", "param",
                                                                                     "code"}


def test_oversized_chunked_body_is_cut_off(server):
    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "%s", "prompt": "' % M
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'
    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_slow_body_times_out(llm):
    with start(llm, body_timeout=0.5) as server, socket.create_connection((server.host, server.port), 10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")  # ... and the rest never comes
        sock.settimeout(10)
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            if not (data := sock.recv(4096)):
                break
            response += data
        assert response.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in response


def test_unknown_route_and_method_are_json_errors(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_on_errors(client, llm):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=llm.name, prompt="hello " * 600)


def test_server_keeps_serving_after_bad_input(server, client, llm):
    for path, content, _ in BAD_REQUESTS.values():
        httpx.post(server.url + path, content=content, timeout=30)
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    r = client.chat.completions.create(model=llm.name, messages=CHAT, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == llm.chat(CHAT, max_new_tokens=5)


# ---- disconnects, limits, timeouts ---------------------------------------------------------------------------------

def test_disconnect_mid_stream_cancels_and_frees_the_slot(server, llm):
    engine = engine_of(server)
    long = {"model": llm.name, "prompt": "a", "max_tokens": 400, "ignore_eos": True}  # >= 20 s at 50 ms a step
    with slowed(engine, 0.05):
        with httpx.stream("POST", server.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as r:
            assert next(line for line in r.iter_lines() if line.startswith("data:"))
            assert engine.num_running == 1
        assert wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=5)
        # A non-streaming client that gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=long, timeout=0.5)
        assert wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=5)


def test_queue_full_gives_429_and_the_server_recovers(llm):
    with start(llm, max_batch=1, max_queue=1) as server:
        engine = engine_of(server)
        long = {"model": llm.name, "prompt": "a", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with slowed(engine, 0.05), contextlib.ExitStack() as streams:
            for _ in range(2):  # one decoding, one waiting
                r = streams.enter_context(httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=30))
                assert r.status_code == 200
            assert wait_until(lambda: engine.num_running == 1)
            r = httpx.post(server.url + "/v1/completions", json={"model": llm.name, "prompt": "a"}, timeout=10)
            assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
            assert r.headers["retry-after"] == "1"
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # a full queue is not down
            assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200
            streams.close()  # both clients go away: both requests are cancelled
            assert wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=5)
        r = httpx.post(server.url + "/v1/completions", json={"model": llm.name, "prompt": "a", "max_tokens": 3},
                       timeout=10)
        assert r.status_code == 200


def test_request_timeout(llm):
    with start(llm, request_timeout=0.3) as server:
        engine = engine_of(server)
        req = {"model": llm.name, "prompt": "a", "max_tokens": 400, "ignore_eos": True}
        with slowed(engine, 0.05):  # >= 20 s for 400 tokens
            r = httpx.post(server.url + "/v1/completions", json=req, timeout=30)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            assert wait_until(lambda: engine.num_running == 0, timeout=5)
            events = httpx.post(server.url + "/v1/completions", json={**req, "stream": True}, timeout=30).text
            assert '"code": "timeout"' in events.split("data: ")[-1] and "[DONE]" not in events
            assert wait_until(lambda: engine.num_running == 0, timeout=5)


# ---- auth, health, metrics, page ---------------------------------------------------------------------------------

def test_api_key(llm):
    with start(llm, api_key=KEY) as server:
        url = server.url
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(url + path, timeout=10).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
        r = httpx.post(url + "/v1/completions", json={"model": llm.name, "prompt": "a"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for path in ("/health", "/", "/static/chat.js", "/static/chat.css"):
            assert httpx.get(url + path, timeout=10).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = good.chat.completions.create(model=llm.name, messages=CHAT, max_tokens=4, temperature=0)
        assert r.choices[0].message.content == llm.chat(CHAT, max_new_tokens=4)


def test_health_and_metrics(server, client, llm):
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok", "model": llm.name}
    client.completions.create(model=llm.name, prompt="count me", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['llama3_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert values["llama3_generation_tokens_total"] >= 3 and values["llama3_prompt_tokens_total"] >= 1
    assert values["llama3_request_duration_seconds_count"] >= 1
    assert values["llama3_time_to_first_token_seconds_count"] >= 1
    assert values["llama3_batch_size_count"] >= 1
    assert values["llama3_queue_depth"] == 0 and values["llama3_running_requests"] == 0


def test_a_stopped_engine_shows_in_health_and_answers_503(llm):
    with start(llm) as server:
        engine_of(server).stop()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        r = httpx.post(server.url + "/v1/completions", json={"model": llm.name, "prompt": "a"}, timeout=10)
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]


def test_page_is_served_and_self_contained(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/chat.js", "/static/chat.css"):
        assert asset in page.text
    for path in ("/", "/static/chat.js", "/static/chat.css"):  # works offline: no CDN, no web font
        text = httpx.get(server.url + path, timeout=10).text
        assert "http://" not in text and "https://" not in text and "@import" not in text


def test_cli_verb_serves_with_the_key_from_the_environment(default_gguf_path, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LLAMA3_API_KEY": KEY}
    command = [sys.executable, "-m", "llama3.cli", "serve", "--port", str(port), "--max-context", "256",
               "--max-batch", "2", "--threads", "1"]
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_until(lambda: proc.poll() is None and _healthy(url), timeout=120), \
                (tmp_path / "server.log").read_text()
            assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
            models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
            assert models["data"][0]["id"] == DEFAULT_MODEL
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert "Finished server process" in (tmp_path / "server.log").read_text()  # SIGTERM shuts down cleanly


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
