"""Tool calling: how tools and calls are written into a prompt, and one parser for the calls in a model's reply.

Tools are OpenAI function definitions, `{"type": "function", "function": {"name", "description", "parameters"}}`;
calls are OpenAI's `{"id", "type": "function", "function": {"name", "arguments": JSON text}}`.

Llama 3.1 / 3.2 (Meta's format): the system prompt says "Environment: ipython" (which also enables the code
interpreter) and lists the built-in tools on a "Tools:" line; custom tools go as JSON into the first user message,
and the model replies `{"name": ..., "parameters": {...}}`; a built-in call is `brave_search.call(query="...")`
after `<|python_tag|>`, code for the interpreter is plain code after it. A message whose call is pending ends in
`<|eom_id|>`; the tool's result comes back in an `ipython` message. Tools named brave_search, wolfram_alpha or
code_interpreter are Meta's built-ins.

Chat templates that know nothing of tools get them described in the system message instead, and earlier calls
written as the JSON the model is asked to produce.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import date

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
PYTHON_TAG = "<|python_tag|>"

# What the first user message says before it when custom tools are offered (the words Meta's Llama 3.1 template
# uses, so a model fine-tuned on them recognises the request).
CUSTOM_TOOLS_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)

GENERIC_TOOLS_INSTRUCTION = (
    "You can call the following tools, given as JSON schemas. To call tools, reply with nothing but one JSON object "
    'per call, {"name": tool name, "parameters": dictionary of argument name and its value}, one per line. '
    "Otherwise answer normally.\n"
)


def tool_function(tool: dict) -> dict:
    """The function definition of an OpenAI tool (or a bare function definition)."""
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}")
    return function


def call_arguments(call: dict) -> dict:
    """An OpenAI tool call's arguments as a dict (they travel as JSON text)."""
    arguments = call["function"].get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call {call['function']['name']!r}: arguments are not JSON: {e}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {call['function']['name']!r}: arguments must be a JSON object")
    return arguments


# ---- Llama 3.1 prompts ---------------------------------------------------------------------------------------------

def llama31_system_prompt(system: str | None, tools: list[dict], today: date | None = None) -> str:
    """The system message of a dialog with tools, laid out as Meta's templates lay it out."""
    builtin = [n for n in (tool_function(t)["name"] for t in tools) if n in BUILTIN_TOOLS]
    listed = [n for n in builtin if n != "code_interpreter"]  # "Environment: ipython" already enables it
    text = "Environment: ipython\n" + (f"Tools: {', '.join(listed)}\n" if listed else "\n")
    text += f"Cutting Knowledge Date: December 2023\nToday Date: {(today or date.today()).strftime('%d %B %Y')}\n"
    return text + (f"\n{system}\n" if system else "")


def llama31_tools_message(custom_tools: list[dict], content: str) -> str:
    """The first user message with the custom tools' definitions before it."""
    return CUSTOM_TOOLS_INSTRUCTION + "".join(json.dumps(t, indent=4) + "\n\n" for t in custom_tools) + content


def llama31_call_text(call: dict) -> str:
    """One call as a Llama 3.1 model writes it (Meta's ChatFormat encoding of a ToolCall)."""
    name, arguments = call["function"]["name"], call_arguments(call)
    if name == "code_interpreter":
        return arguments["code"]
    if name in BUILTIN_TOOLS:
        return f'{name}.call(query="{arguments["query"]}")'
    return json.dumps({"type": "function", "name": name, "parameters": arguments})


def generic_tool_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages for a chat template that does not render tools: the tools described in the system message, and
    earlier calls written out as the JSON lines the model is asked to reply with."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(json.dumps({"name": c["function"]["name"], "parameters": call_arguments(c)})
                              for c in m["tool_calls"])
            m = {"role": m["role"], "content": (m.get("content") or "") + calls}
        out.append({**m, "content": m.get("content") or ""})
    if tools:
        prompt = GENERIC_TOOLS_INSTRUCTION + "".join(json.dumps(tool_function(t)) + "\n" for t in tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ---- parsing replies -----------------------------------------------------------------------------------------------

@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


_BUILTIN_CALL = re.compile(r'(brave_search|wolfram_alpha)\.call\(query="([^"]*)"\)')
_BUILTIN_STARTS = ('brave_search.call(query="', 'wolfram_alpha.call(query="')
_FUNCTION_TAG = "<function="
_FUNCTION_OPEN = re.compile(r"<function=([^>{}]+)>")


def _object_end(text: str, start: int) -> int | None:
    """The index after the JSON object starting at text[start] ('{'), or None if it is not complete yet."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _json_call(text: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text already
        return ToolCall(obj["name"], arguments)
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _is_prefix(text: str, *words: str) -> bool:
    return any(w.startswith(text) for w in words)


def parse_calls(text: str, final: bool) -> tuple[bool | None, list[ToolCall], int]:
    """Read a reply (or the part of it generated so far).

    Returns (is_calls, calls, end): is_calls is None while the start does not yet say whether the reply is tool
    calls or text, False for text, True for calls; `calls` are the complete calls so far (in order), and `end`
    where the text stops being calls: with final=True everything from there on is text the parser could not read
    as a call, returned as content rather than dropped. Calls are JSON objects `{"name", "parameters"}` (or
    "arguments") separated by whitespace, ';' or ',', `<function=NAME>{...}</function>`, Meta's built-in
    `NAME.call(query="...")`, and after `<|python_tag|>` anything else is code for the code interpreter.
    """
    i = len(text) - len(text.lstrip())
    tagged = text.startswith(PYTHON_TAG, i)
    if not tagged and not final and _is_prefix(text[i:], PYTHON_TAG):
        return None, [], 0
    start = i + len(PYTHON_TAG) if tagged else i
    rest = text[start:].lstrip()
    if not rest and not final:
        return None, [], 0
    if not (rest.startswith("{") or rest.startswith(_FUNCTION_TAG) or _BUILTIN_CALL.match(rest) or tagged):
        if not final and (_is_prefix(rest, _FUNCTION_TAG, *_BUILTIN_STARTS) or rest.startswith(_BUILTIN_STARTS)):
            return None, [], 0  # may still become a call
        return False, [], 0
    calls, pos = [], start
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in ";,"):
            pos += 1
        if pos == len(text):
            break
        if text[pos] == "{":
            end = _object_end(text, pos)
            call = None if end is None else _json_call(text[pos:end])
        elif m := _FUNCTION_OPEN.match(text, pos):
            end = _object_end(text, m.end()) if text.startswith("{", m.end()) else None
            call = None
            if end is not None and text.startswith("</function>", end):
                call = _json_call(f'{{"name": {json.dumps(m[1])}, "parameters": {text[m.end():end]}}}')
                end += len("</function>")
        elif m := _BUILTIN_CALL.match(text, pos):
            call, end = ToolCall(m[1], json.dumps({"query": m[2]}, ensure_ascii=False)), m.end()
        else:
            call = end = None
        if call is None:
            break
        calls.append(call)
        pos = end
    if final and tagged and not calls and text[start:].strip():  # <|python_tag|> then code
        return True, [ToolCall("code_interpreter", json.dumps({"code": text[start:].strip()}))], len(text)
    return True, calls, pos


class ToolCallParser:
    """Splits a reply fed piece by piece into content and tool calls. It holds back what is still undecided, so
    whatever the pieces, the content and calls it hands out add up to those of the whole reply read at once."""

    def __init__(self):
        self.text = ""
        self.calls_out = 0  # calls handed out
        self.content_out = 0  # characters of content handed out

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        """New content and newly completed calls after this piece of the reply."""
        self.text += piece
        return self._step(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest, at the end of the reply: content the parser could not read as calls is returned as content."""
        return self._step(final=True)

    def _step(self, final: bool) -> tuple[str, list[ToolCall]]:
        is_calls, calls, end = parse_calls(self.text, final)
        if is_calls is None:
            return "", []
        if not is_calls:
            content, self.content_out = self.text[self.content_out:], len(self.text)
            return content, []
        new, self.calls_out = calls[self.calls_out:], len(calls)
        content = ""
        if final and self.text[end:].strip():
            content = self.text[end:] if calls else self.text
        return content, new


def parse_reply(text: str) -> tuple[str, list[ToolCall]]:
    """A whole reply's content and tool calls (the same parser as streaming)."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    more, rest = parser.finish()
    return content + more, calls + rest
