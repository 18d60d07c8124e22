"""Tool calling: Llama 3.1 prompts token for token as Meta's llama-models writes them, tools through a Jinja chat
template as transformers renders them, and one reply parser that gives the same calls however the reply is
chunked."""

from __future__ import annotations

import importlib.resources
import json
import re
from datetime import date

import pytest

from llama3.tokenizer import ChatFormat, TemplateChatFormat, Tokenizer
from llama3.tools import ToolCallParser, parse_reply

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SEARCH = {"type": "function", "function": {"name": "brave_search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}}}}
WOLFRAM = {"type": "function", "function": {"name": "wolfram_alpha"}}
CODE = {"type": "function", "function": {"name": "code_interpreter"}}


def call(name, arguments, id="call_1"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def meta_prompt_examples() -> dict[str, str]:
    """The rendered prompts of Meta's Llama 3.1 prompt-format guide, by section title."""
    text = (importlib.resources.files("llama_models") / "llama3_1" / "prompt_format.md").read_text()
    out = {}
    for m in re.finditer(r"##### Input Prompt Format\n```\n(.*?)```", text, re.S):
        title = re.findall(r"^## (.+)$", text[:m.start()], re.M)[-1]
        out[title.strip()] = m[1][:-1]  # the newline before the closing fence
    return out


def test_system_prompt_as_meta_guide_renders_it(tokenizer):
    examples = meta_prompt_examples()
    fmt = ChatFormat(tokenizer)
    builtin = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]
    ids = fmt.encode_dialog_prompt(builtin, tools=[SEARCH, WOLFRAM], today=date(2024, 9, 21))
    assert tokenizer.decode(ids) == examples["Builtin Tool Calling"]
    assert ids == tokenizer.encode(examples["Builtin Tool Calling"], allowed_special="all")
    # Custom tools only: "Environment: ipython" and an empty line where the Tools: line would be.
    system = ChatFormat.with_tools([{"role": "system", "content": "You are a helpful assistant."}], [WEATHER],
                                   date(2024, 9, 21))[0]["content"]
    guide = examples["JSON based tool calling"]
    assert guide.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>")
    code_only = ChatFormat.with_tools([], [CODE], date(2024, 9, 21))[0]["content"]
    assert code_only.startswith("Environment: ipython\n\nCutting Knowledge Date")  # never on the Tools: line


def test_dialog_with_calls_and_results_equals_meta_chat_format(tokenizer):
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.datatypes import ToolCall as MetaToolCall
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    dialog = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris and Rome, the time, and the price of gold?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Rome", "unit": "celsius"}, "c2")]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "25 C"},
        {"role": "assistant", "content": "", "tool_calls": [call("brave_search", {"query": "gold price"})]},
        {"role": "tool", "content": "2650 USD"},
        {"role": "assistant", "content": "", "tool_calls": [call("code_interpreter", {"code": "print(2 + 2)"})]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "Paris 21, Rome 25; gold 2650 USD."},
        {"role": "user", "content": "And the time?"},
    ]
    tools = [WEATHER, TIME, SEARCH, CODE]
    ours = ChatFormat(tokenizer).encode_dialog_prompt(dialog, tools=tools, today=date(2025, 1, 2))

    def meta_message(m):
        calls = [MetaToolCall(call_id=c["id"], tool_name=c["function"]["name"],
                              arguments=json.loads(c["function"]["arguments"])) for c in m.get("tool_calls") or []]
        return RawMessage(role=m["role"], content=m["content"] or "", tool_calls=calls,
                          stop_reason=StopReason.end_of_message if calls else None)

    meta_dialog = [meta_message(m) for m in ChatFormat.with_tools(dialog, tools, date(2025, 1, 2))]
    expected = MetaChatFormat(MetaTokenizer.get_instance()).encode_dialog_prompt(meta_dialog).tokens
    assert ours == expected
    text = tokenizer.decode(ours)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n25 C<|eot_id|>" in text
    assert '<|python_tag|>print(2 + 2)<|eom_id|>' in text and 'brave_search.call(query="gold price")<|eom_id|>' in text
    assert text.count('"name": "get_weather"') == 2 + 1  # two calls and the definition
    user = text.split("<|start_header_id|>user<|end_header_id|>\n\n")[1]
    assert user.startswith("Given the following functions") and '"name": "get_time"' in user
    assert '"name": "brave_search"' not in user  # built-ins are named on the system prompt's Tools: line


def test_no_tools_leaves_the_dialog_unchanged(tokenizer):
    dialog = [{"role": "user", "content": "hi"}]
    assert ChatFormat(tokenizer).encode_dialog_prompt(dialog, tools=None) == \
        ChatFormat(tokenizer).encode_dialog_prompt(dialog)


TOOL_TEMPLATE = (  # a tools-aware template in the style of the Llama 3.1 / Qwen templates
    "{% if tools %}<|system|>Tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{\"name\": \"{{ c.function.name }}\", \"parameters\": {{ c.function.arguments | tojson }}}"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_template_renders_tools_as_transformers_does(default_gguf_path):
    transformers = pytest.importorskip("transformers")
    from llama3.tokenizer import BPETokenizer
    tok = BPETokenizer.from_gguf(default_gguf_path)
    data, config = tok.to_tokenizer_json()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(
        json.dumps(data)), bos_token=config["bos_token"], eos_token=config["eos_token"])
    dialog = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris"})]},
              {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    ours = TemplateChatFormat(tok, TOOL_TEMPLATE, tok.bos_token, tok.eos_token).render(dialog, tools=[WEATHER])
    hf_dialog = [{**m, "tool_calls": [{**c, "function": {**c["function"],
                                                          "arguments": json.loads(c["function"]["arguments"])}}
                                      for c in m["tool_calls"]]} if "tool_calls" in m else m for m in dialog]
    theirs = hf.apply_chat_template(hf_dialog, tools=[WEATHER], chat_template=TOOL_TEMPLATE, tokenize=False,
                                    add_generation_prompt=True)
    assert ours == theirs and '"parameters": {"city": "Paris"}' in ours


def test_template_without_tools_describes_them_in_the_system_message(default_gguf_path):
    from llama3.tokenizer import BPETokenizer, chat_format_for
    fmt = chat_format_for(BPETokenizer.from_gguf(default_gguf_path))  # the default model's ChatML template
    assert not fmt.knows_tools
    dialog = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"})]},
              {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    text = fmt.render(dialog, tools=[WEATHER])
    assert text.startswith("<|im_start|>system\nYou can call the following tools")
    assert json.dumps(WEATHER["function"]) in text
    assert '<|im_start|>assistant\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|im_end|>' in text
    assert "<|im_start|>tool\n21 C<|im_end|>" in text


REPLIES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
     "", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "a;b}"}}\n'
     '{"name": "get_time", "arguments": {}}\n', "", [("get_weather", {"city": "a;b}"}), ("get_time", {})]),
    ('{"name": "a", "parameters": {}}{"name": "b", "parameters": {"x": [1, {"y": "}"}]}}', "",
     [("a", {}), ("b", {"x": [1, {"y": "}"}]})]),  # Meta's encoder writes calls back to back
    ('<|python_tag|>brave_search.call(query="gold price")', "", [("brave_search", {"query": "gold price"})]),
    ("<|python_tag|>import math\nprint(math.pi)", "", [("code_interpreter", {"code": "import math\nprint(math.pi)"})]),
    ('<function=get_time>{"tz": "UTC"}</function>', "", [("get_time", {"tz": "UTC"})]),
    ('{"name": "get_time", "parameters": {}}\nand some words', "and some words", [("get_time", {})]),
    ("The weather is nice {\"name\": \"x\"}", "The weather is nice {\"name\": \"x\"}", []),
    ('  {"name": "cut off', '  {"name": "cut off', []),  # never dropped: what is not a call is content
    ("brave new world", "brave new world", []),
    ("", "", []),
]


@pytest.mark.parametrize("reply,content,calls", REPLIES)
def test_one_parser_whatever_the_chunking(reply, content, calls):
    whole = parse_reply(reply)
    assert whole[0] == content
    assert [(c.name, json.loads(c.arguments)) for c in whole[1]] == calls
    for size in (1, 2, 5):
        parser, got_content, got_calls = ToolCallParser(), "", []
        for i in range(0, len(reply), size):
            text, new = parser.feed(reply[i:i + size])
            got_content, got_calls = got_content + text, got_calls + new
        text, new = parser.finish()
        assert (got_content + text, [(c.name, c.arguments) for c in got_calls + new]) == \
            (whole[0], [(c.name, c.arguments) for c in whole[1]]), size


def test_streamed_text_is_not_held_back_once_it_is_not_a_call():
    parser = ToolCallParser()
    assert parser.feed("Hel") == ("Hel", [])
    assert parser.feed("lo") == ("lo", [])
    parser = ToolCallParser()
    assert parser.feed('{"name": "a", "parameters": {}}') [1][0].name == "a"  # a complete call goes out at once
