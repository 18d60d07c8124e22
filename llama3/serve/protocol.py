"""The OpenAI API's request and response shapes, as far as this server implements them.

Requests are validated strictly (a string where a number belongs is an error, not a guess); every problem becomes
an `APIError` that is sent as OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..generate import SamplingParams, TokenLogprob
from ..tools import ToolCall


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(body: bytes) -> Any:
    """Request bytes -> JSON value; invalid UTF-8, malformed JSON and lone surrogates are clean 400s."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_body") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    try:  # "\ud800" escapes decode to lone surrogates, which no tokenizer can encode
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request contains invalid Unicode (a lone surrogate escape)",
                       code="invalid_body") from None
    return value


# ---- requests ----------------------------------------------------------------------------------------------------

# Parameters of the OpenAI API this server does not implement, and the values that mean "not used".
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}), "functions": (None, []),
               "function_call": (None, "none")}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class APIRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @classmethod
    def parse(cls, payload: Any):
        if not isinstance(payload, dict):
            raise APIError(400, "the request body must be a JSON object")
        for name, unused in UNSUPPORTED.items():
            if payload.get(name) not in (None, *unused):
                raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported")
        try:
            return cls.model_validate(payload)
        except ValidationError as e:
            err = e.errors()[0]
            loc = [str(p) for p in err["loc"]]
            raise APIError(400, f"invalid '{'.'.join(loc)}': {err['msg']}" if loc else err["msg"],
                           param=loc[0] if loc else None) from None


class SamplingRequest(APIRequest):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    # Not OpenAI's (llama-server's names): a llama.cpp repeat penalty and min-p sampling.
    repeat_penalty: float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    ignore_eos: bool = False  # not OpenAI's: keep generating past end-of-turn (benchmarks want fixed lengths)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, choice: int) -> SamplingParams:
        """Choice `choice` of n samples with seed + choice."""
        return SamplingParams(self.temperature, self.top_p, 0, None if self.seed is None else (self.seed + choice) % 2**63,
                              min_p=self.min_p, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, repeat_penalty=self.repeat_penalty)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str  # JSON text


class ToolCallIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages

    @model_validator(mode="after")
    def _check(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        for call in self.tool_calls or ():
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError:
                raise ValueError(f"tool call {call.id!r}: arguments are not JSON text") from None
            if not isinstance(arguments, dict):
                raise ValueError(f"tool call {call.id!r}: arguments must be a JSON object")
        return self

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(APIRequest):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


# ---- responses ---------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llama3"}


class Reply:
    """The JSON shapes of one API call's answer: chat or text completion, whole or streamed in chunks.

    `token_text(id)` and `token_bytes(id)` spell a token for logprobs (OpenAI reports each token's text and bytes)."""

    def __init__(self, chat: bool, id: str, model: str, n: int, tokenizer=None):
        self.chat, self.id, self.model, self.n, self.created = chat, id, model, n, now()
        self.tokenizer = tokenizer

    def _envelope(self, object: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def full(self, texts: list[str], reasons: list[str], usage: dict, tool_calls: list[list[ToolCall]] | None = None,
             logprobs: list[list[TokenLogprob] | None] | None = None) -> dict:
        logprobs = logprobs or [None] * len(texts)
        if self.chat:
            choices = []
            for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs)):
                calls = tool_calls[i] if tool_calls else []
                message = {"role": "assistant", "content": t if t or not calls else None}
                if calls:
                    message["tool_calls"] = [c.as_openai() for c in calls]
                choices.append({"index": i, "message": message, "finish_reason": r, "logprobs": self.logprobs(lp)})
            return self._envelope("chat.completion", choices, usage=usage)
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": self.logprobs(lp)}
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
        return self._envelope("text_completion", choices, usage=usage)

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              logprobs: list[TokenLogprob] | None = None, tool_call: dict | None = None,
              text_offset: int = 0) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            if tool_call is not None:
                delta["tool_calls"] = [tool_call]
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": self.logprobs(logprobs)}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason,
                  "logprobs": self.logprobs(logprobs, text_offset)}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)

    # ---- logprobs: chat's list of {token, logprob, bytes, top_logprobs}; completions' parallel lists ---------------

    def token_bytes(self, token: int) -> bytes:
        tok = self.tokenizer
        if hasattr(tok, "token_bytes"):  # byte-level BPE
            return tok.token_bytes[token]
        if hasattr(tok, "encoding"):  # tiktoken
            return tok.encoding.decode_single_token_bytes(token)
        return tok.decode([token]).encode()

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def logprobs(self, entries: list[TokenLogprob] | None, text_offset: int = 0) -> dict | None:
        if entries is None:
            return None
        if self.chat:
            def one(token, logprob):
                return {"token": self.token_text(token), "logprob": logprob, "bytes": list(self.token_bytes(token))}
            return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                                for e in entries], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:  # a prompt's first token has no logprob (None)
            text = self.token_text(e.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(None if e.logprob is None else {self.token_text(t): lp for t, lp in e.top})
            out["text_offset"].append(text_offset)
            text_offset += len(text)
        return out
