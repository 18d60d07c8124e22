"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app (uvicorn serves it).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health, GET /metrics, and the
chat page at /. Handlers only parse, check limits and await the engine's outputs; the model runs on the engine's
thread. With an API key, everything except /health and the page's files needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..constrain import Constraint, ConstraintError, json_schema_grammar, tool_calls_grammar
from ..tools import PYTHON_TAG, ToolCallParser
from .connections import ConnectionGuard, guarded_protocol
from .engine import Engine, Output, QueueFull
from .engine import Request as EngineRequest
from .metrics import ServeMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, Reply, SamplingRequest,
                       model_card, new_id, now, parse_json, usage)

log = logging.getLogger("llama3.serve")
STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    api_key: str | None = None
    max_batch: int = 64  # requests decoded together
    max_context: int | None = None  # tokens per request, prompt + completion (default: the model's)
    max_queue: int = 64  # requests waiting for a free slot before new ones get 429
    prefill_chunk: int = 256  # prompt tokens prefilled per engine step
    kv_cache_tokens: int | None = None  # positions the paged KV cache holds for all requests (default 4 contexts)
    prefix_caching: bool = True  # share computed prompt prefixes between requests
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0  # seconds from receiving a request to its last token
    body_timeout: float = 30.0  # seconds to receive a request body
    header_timeout: float = 10.0  # seconds for a connection to deliver request headers (after connecting or a reply)
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1024  # open connections in all; past it idle ones are closed, or newcomers get 503
    max_client_connections: int = 128  # open connections per client address, the same way
    retry_after: int = 1  # seconds, in the Retry-After header of 429 and 503 answers


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


class Generation:
    """The event-loop side of one API call: its engine requests (n choices per prompt), their outputs, and a watcher
    that cancels them when the client disconnects or the deadline passes, whether or not anyone reads the outputs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output | Exception]] = asyncio.Queue()
        self.requests: list[EngineRequest] = []
        self.watcher: asyncio.Task | None = None

    def emitter(self, index: int) -> Callable[[Output], None]:
        """The callback the engine thread calls with choice `index`'s outputs."""
        return lambda out: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

    def submit(self, requests: list[EngineRequest], request: Request, timeout: float) -> None:
        self.requests = requests
        if not self.engine.alive:
            raise APIError(503, "the generation engine has stopped; see the server log", type="server_error")
        try:
            self.engine.submit(requests)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="server_busy") from None
        self.watcher = asyncio.create_task(self._watch(request, timeout))

    def close(self) -> None:
        """Stop the watcher and any choice still generating."""
        if self.watcher is not None:
            self.watcher.cancel()
        self.engine.cancel(r for r in self.requests if not r.finished)

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """(choice index, output) until every choice has finished. Raises ClientGone if the client disconnects and
        APIError 504 past the deadline; however it ends, the engine stops working on this call."""
        remaining = len(self.requests)
        try:
            while remaining:
                index, out = await self.queue.get()
                if isinstance(out, Exception):
                    raise out
                remaining -= out.finish_reason is not None
                yield index, out
        finally:
            self.close()

    async def _watch(self, request: Request, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            reason: Exception = ClientGone()
        except TimeoutError:
            reason = APIError(504, f"the request took longer than {timeout:g} s", type="timeout", code="timeout")
        self.engine.cancel(r for r in self.requests if not r.finished)
        self.queue.put_nowait((-1, reason))


def create_app(llm, config: ServeConfig | None = None) -> FastAPI:
    """The server for one loaded model (`llama3.load(...)`); its engine starts and stops with the app."""
    config = config or ServeConfig()
    name = llm.name or "llama3"
    created = now()
    metrics = ServeMetrics()
    engine = Engine(llm.model, llm.tokenizer, max_batch=config.max_batch, max_context=config.max_context,
                    max_queue=config.max_queue, prefill_chunk=config.prefill_chunk,
                    kv_cache_tokens=config.kv_cache_tokens, prefix_caching=config.prefix_caching, metrics=metrics)
    metrics.watch_engine(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="llama3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        if e.status in (429, 503):
            headers = {"Retry-After": str(config.retry_after)}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    def require_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request):
        limit = config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(config.body_timeout):
                async for chunk in request.stream():  # counted as it arrives: a chunked body has no length header
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {config.body_timeout:g} s",
                           code="timeout") from None
        return parse_json(b"".join(chunks))

    def check_model(requested: str) -> None:
        if requested != name:
            raise APIError(404, f"the model '{requested}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")

    def completion_budget(prompts: list[list[int]], limit: int | None, field: str) -> int:
        """max_tokens for these prompts: the request's, checked against the context, or all the room left."""
        context, longest = engine.max_context, max(len(p) for p in prompts)
        if longest >= context:
            raise APIError(400, f"this server's context is {context} tokens, but the {field} has {longest} tokens",
                           param=field, code="context_length_exceeded")
        if limit is not None and longest + limit > context:
            raise APIError(400, f"this server's context is {context} tokens, but {longest + limit} were requested "
                                f"({longest} in the {field}, {limit} for the completion); lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        return limit or context - longest

    def output_rules(body: SamplingRequest) -> tuple[str | None, bool, bool]:
        """(grammar, lazy, parse_tools) for a request: the constraint its tools or response_format ask for, whether
        the constraint waits for a call to begin (tool_choice "auto"), and whether replies are parsed for calls."""
        if not isinstance(body, ChatCompletionRequest):
            return None, False, False
        tools, choice, fmt = body.tools or [], body.tool_choice, body.response_format
        if choice is not None and choice != "none" and not tools:
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        active = bool(tools) and choice != "none"
        if active and fmt is not None and fmt.type != "text":
            raise APIError(400, "give 'response_format' or 'tools' (with tool_choice other than 'none'), not both",
                           param="response_format")
        try:
            if fmt is not None and fmt.type != "text":
                return json_schema_grammar(fmt.json_schema.schema_ if fmt.type == "json_schema" else None), False, False
            if not active:
                return None, False, False
            defs = [t.model_dump() for t in tools]
            if not isinstance(choice, str) and choice is not None:
                defs = [t for t in defs if t["function"]["name"] == choice.function.name]
                if not defs:
                    raise APIError(400, f"tool_choice names '{choice.function.name}', which is not in 'tools'",
                                   param="tool_choice")
            lazy = choice in (None, "auto")
            grammar = tool_calls_grammar(defs, parallel=body.parallel_tool_calls and isinstance(choice, str | None),
                                         python_tag=PYTHON_TAG in getattr(llm.tokenizer, "special_tokens", {}),
                                         leading_space=lazy)
            return grammar, lazy, True
        except ConstraintError as e:
            raise APIError(400, str(e), param="response_format" if fmt is not None else "tools") from None

    async def generate(request: Request, body: SamplingRequest, prompts: list[list[int]], chat: bool,
                       started: float):
        field = "messages" if chat else "prompt"
        echo = getattr(body, "echo", False)
        logprobs = body.logprobs_count
        if body.token_limit == 0 and not (echo and logprobs is not None):
            raise APIError(400, "max_tokens may be 0 only with echo and logprobs (scoring the prompt)",
                           param="max_tokens")
        max_tokens = 0 if body.token_limit == 0 else completion_budget(prompts, body.token_limit, field)
        if body.token_limit == 0:
            completion_budget(prompts, None, field)  # the prompt must still fit
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if body.n > config.max_batch:
            raise APIError(400, f"n must be at most {config.max_batch} on this server", param="n")
        if len(prompts) * body.n > config.max_batch + config.max_queue:
            raise APIError(400, f"at most {config.max_batch + config.max_queue} completions per request",
                           param="prompt")
        grammar, lazy, parse_tools = await run_in_threadpool(output_rules, body)
        choices = [(p, j) for p in prompts for j in range(body.n)]
        try:
            constraints = [None if grammar is None else Constraint(llm.tokenizer, grammar, lazy) for _ in choices]
        except ConstraintError as e:
            raise APIError(400, str(e), param="response_format") from None
        gen = Generation(engine)
        gen.submit([EngineRequest(p, max_tokens=max_tokens, stop=stops, ignore_eos=body.ignore_eos,
                                  emit=gen.emitter(i), params=body.sampling_params(j), constraint=constraints[i],
                                  logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
                    for i, (p, j) in enumerate(choices)],
                   request, timeout=config.request_timeout - (time.perf_counter() - started))
        prompt_tokens = sum(len(p) for p in prompts)
        reply = Reply(chat, new_id("chatcmpl" if chat else "cmpl"), name, len(choices), llm.tokenizer)
        outputs = timed(gen.outputs(), started, metrics)
        parsers = [ToolCallParser() if parse_tools else None for _ in choices]
        echoed = [llm.tokenizer.decode(p) if echo else "" for p, _ in choices]
        if body.stream:
            return StreamingResponse(stream(reply, outputs, prompt_tokens, body.include_usage, parsers, echoed),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        n = len(choices)
        texts, reasons, calls, completion_tokens = list(echoed), [""] * n, [[] for _ in range(n)], 0
        token_logprobs = [[] if logprobs is not None else None for _ in range(n)]
        try:
            async for i, out in outputs:
                if out.error:
                    raise APIError(500, out.error, type="server_error")
                texts[i] += out.text
                if token_logprobs[i] is not None:
                    token_logprobs[i] += (out.prompt_logprobs or []) + (out.logprobs or [])
                if out.finish_reason:
                    reasons[i], completion_tokens = out.finish_reason, completion_tokens + out.completion_tokens
        except ClientGone:
            return PlainTextResponse("", status_code=499)  # nobody reads it; the status shows in logs and metrics
        for i, parser in enumerate(parsers):
            if parser is not None:
                content, first = parser.feed(texts[i])
                rest, more = parser.finish()
                texts[i], calls[i] = content + rest, first + more
                if calls[i] and reasons[i] == "stop":
                    reasons[i] = "tool_calls"
        return reply.full(texts, reasons, usage(prompt_tokens, completion_tokens), calls, token_logprobs)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    embedding_lock = asyncio.Lock()

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card(name, created)]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card(name, created)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        body = ChatCompletionRequest.parse(await read_json(request))
        check_model(body.model)
        messages = [m.as_dict() for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        try:  # tokenizing a long conversation takes a while: keep it off the event loop
            prompt = await run_in_threadpool(llm.encode_chat, messages, tools)
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(400, f"cannot format these messages: {e}", param="messages") from None
        return await generate(request, body, [prompt], chat=True, started=started)

    @v1.post("/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        body = CompletionRequest.parse(await read_json(request))
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
        vocab = llm.model.args.vocab_size
        if any(isinstance(p, list) and any(not 0 <= t < vocab for t in p) for p in prompt):
            raise APIError(400, f"'prompt' has token ids outside the vocabulary [0, {vocab})", param="prompt")
        ids = [p if isinstance(p, list) else await run_in_threadpool(llm.encode_prompt, p) for p in prompt]
        if any(not p for p in ids):
            raise APIError(400, "'prompt' is empty", param="prompt")
        return await generate(request, body, ids, chat=False, started=started)

    @v1.post("/embeddings")
    async def embeddings(request: Request):
        body = EmbeddingRequest.parse(await read_json(request))
        check_model(body.model)
        if body.dimensions is not None:
            raise APIError(400, "'dimensions' is not supported: vectors have the model's width", param="dimensions")
        inputs = body.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        vocab = llm.model.args.vocab_size
        ids = [p if isinstance(p, list) else llm.encode_prompt(p) for p in inputs]
        if not ids or any(not p for p in ids):
            raise APIError(400, "'input' is empty", param="input")
        if any(not 0 <= t < vocab for p in ids for t in p):
            raise APIError(400, f"'input' has token ids outside the vocabulary [0, {vocab})", param="input")
        if max(map(len, ids)) > engine.max_context:
            raise APIError(400, f"an input has more than the server's {engine.max_context} tokens", param="input",
                           code="context_length_exceeded")
        async with embedding_lock:  # one embedding pass at a time beside the engine's thread
            vectors = await run_in_threadpool(llm.embed, ids)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        tokens = sum(map(len, ids))
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    app.include_router(v1)

    # vLLM's tokenizer routes: lm-eval's "remote" tokenizer reads them, so it scores with exactly our tokens.
    @app.get("/tokenizer_info", dependencies=[Depends(require_api_key)])
    async def tokenizer_info():
        tok = llm.tokenizer
        spell = lambda i: None if i is None else tok.decode([i])  # noqa: E731
        template = getattr(tok, "chat_template", None)
        return {"bos_token": spell(getattr(tok, "bos_id", None)), "eos_token": spell(getattr(tok, "eos_id", None)),
                "pad_token": spell(getattr(tok, "pad_id", None)), "chat_template": template,
                "model_max_length": engine.max_context}

    @app.post("/tokenize", dependencies=[Depends(require_api_key)])
    async def tokenize(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise APIError(400, "'prompt' must be a string", param="prompt")
        special = body.get("add_special_tokens", True)
        ids = llm.encode_prompt(body["prompt"]) if special else llm.tokenizer.encode(body["prompt"])
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_context}

    @app.post("/detokenize", dependencies=[Depends(require_api_key)])
    async def detokenize(request: Request):
        body = await read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = llm.model.args.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return {"prompt": llm.tokenizer.decode(tokens)}

    @app.get("/metrics", dependencies=[Depends(require_api_key)])
    async def get_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "model": name}, status_code=503)
        return {"status": "ok", "model": name}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers and tools ask for this path whatever the page links to
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


async def stream(reply: Reply, outputs: AsyncIterator[tuple[int, Output]], prompt_tokens: int,
                 include_usage: bool, parsers: list[ToolCallParser | None], echoed: list[str]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, tool calls as OpenAI streams them (the call's id and name,
    then its arguments), one chunk per finished choice, maybe usage, then [DONE]."""
    completion_tokens = 0
    calls_sent = [0] * reply.n
    offsets = [0] * reply.n  # completions' text_offset of the next token
    echo_pending = [bool(e) for e in echoed]
    try:
        if reply.chat:
            for i in range(reply.n):
                yield sse(reply.chunk(i, role=True))
        async for i, out in outputs:
            if out.error:  # the OpenAI client raises an APIError on an event carrying "error"
                yield sse(APIError(500, out.error, type="server_error").body())
                return
            text, logprobs = out.text, (out.prompt_logprobs or []) + (out.logprobs or []) or None
            if echo_pending[i]:
                text, echo_pending[i] = echoed[i] + text, False
            new_calls = []
            if parsers[i] is not None:
                text, new_calls = parsers[i].feed(text)
                if out.finish_reason:
                    rest, more = parsers[i].finish()
                    text, new_calls = text + rest, new_calls + more
            if text or logprobs:
                yield sse(reply.chunk(i, text, logprobs=logprobs, text_offset=offsets[i]))
                offsets[i] += len(text)
            for call in new_calls:
                head = {"index": calls_sent[i], "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}}
                yield sse(reply.chunk(i, tool_call=head))
                yield sse(reply.chunk(i, tool_call={"index": calls_sent[i], "function": {"arguments": call.arguments}}))
                calls_sent[i] += 1
            if out.finish_reason:
                completion_tokens += out.completion_tokens
                reason = "tool_calls" if calls_sent[i] and out.finish_reason == "stop" else out.finish_reason
                yield sse(reply.chunk(i, finish_reason=reason))
        if include_usage:
            yield sse(reply.usage_chunk(usage(prompt_tokens, completion_tokens)))
        yield sse("[DONE]")
    except APIError as e:  # the timeout, after the 200 status went out
        yield sse(e.body())
    except ClientGone:
        pass
    finally:
        await outputs.aclose()


async def timed(outputs: AsyncIterator[tuple[int, Output]], started: float,
                metrics: ServeMetrics) -> AsyncIterator[tuple[int, Output]]:
    """Pass outputs through, recording time to first token and to the end."""
    first = True
    try:
        async for item in outputs:
            if first:
                metrics.time_to_first_token.observe(time.perf_counter() - started)
                first = False
            yield item
    finally:
        await outputs.aclose()
        if not first:
            metrics.request_latency.observe(time.perf_counter() - started)


class CountRequests:
    """ASGI middleware counting answered HTTP requests by route and status (plain ASGI, so streams pass through
    untouched)."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics", "/")

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = next((r for r in self.ROUTES if path == r or r == "/v1/models" and path.startswith(r)), "other")

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(route=route, status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def connection_budget(wanted: int) -> int:
    """Connections the process can hold: raises its open-file limit towards `wanted` (plus room for the model's
    files and logs) as far as the hard limit allows; a lower cap than asked is logged, never a failing accept."""
    import resource
    spare = 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + spare:
        soft = wanted + spare if hard == resource.RLIM_INFINITY else min(hard, wanted + spare)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted + spare:
        log.warning("the open-file limit (%d) allows %d connections, not %d", soft, soft - spare, wanted)
        return max(1, soft - spare)
    return wanted


def uvicorn_config(app: FastAPI, **kwargs):
    """uvicorn's settings for this app: HTTP/1.1 under the connection guard with the app's ServeConfig limits."""
    import uvicorn
    config: ServeConfig = app.state.config
    guard = ConnectionGuard(max_total=connection_budget(config.max_connections),
                            max_per_client=config.max_client_connections,
                            header_timeout=config.header_timeout, retry_after=config.retry_after)
    return uvicorn.Config(app, http=guarded_protocol(guard), timeout_keep_alive=config.keep_alive_timeout,
                          **kwargs)


class BackgroundServer:
    """Serve an app with uvicorn on a background thread, on a free loopback port (tests, benchmarks, notebooks).

        with BackgroundServer(create_app(llm)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
