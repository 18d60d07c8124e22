"""The `llama3` command. Each verb is one plain typed function; its parser and --help are generated from the
signature and the docstring's `Args:` section."""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Literal

from .bench import bench
from .finetune import finetune
from .hub import DEFAULT_MODEL
from .quantize import quantize
from .serve import serve
from .train import train


def generate(prompt: str, *, model: str = DEFAULT_MODEL, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
             dtype: str | None = None, quantize: Literal["int8", "int4"] | None = None,
             adapter: str | None = None, compile: bool = False) -> None:
    """Continue PROMPT (raw completion, no chat template) and stream the text to stdout.

    Args:
        prompt: the text to continue
        model: known model name, .gguf file, or Meta / Hugging Face checkpoint directory
        max_new_tokens: most tokens to generate
        temperature: 0 means greedy
        top_p: nucleus sampling mass
        top_k: sample among the k most likely tokens (0 = all)
        seed: random seed for sampling
        stop: strings that end the completion
        dtype: float32, bfloat16 or float16 (default: the checkpoint's; GGUF is dequantized to float32)
        quantize: quantize the weights while loading (weight-only int8 or 4-bit)
        adapter: a LoRA adapter directory (from llama3 finetune) merged into the model
        compile: compile the decoding step with torch.compile (tens of seconds once, then faster tokens)
    """
    llm = load_for_inference(model, dtype, quantize, adapter, compile)
    for delta in llm.stream_ids(llm.encode_prompt(prompt), max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, stop=stop):
        print(delta, end="", flush=True)
    print()


def chat(*, model: str = DEFAULT_MODEL, system: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
         max_new_tokens: int = 512, seed: int | None = None, dtype: str | None = None,
         quantize: Literal["int8", "int4"] | None = None, adapter: str | None = None,
         compile: bool = False, json_schema: str | None = None) -> None:
    """Chat with a model. Type /reset to start over, /exit to quit. With stdin not a terminal, each input line is one
    user message and each reply is printed on its own line.

    Args:
        model: known model name, .gguf file, or Meta / Hugging Face checkpoint directory
        system: system prompt
        temperature: 0 means greedy
        top_p: nucleus sampling mass
        max_new_tokens: most tokens per reply
        seed: random seed for sampling
        dtype: float32, bfloat16 or float16
        quantize: quantize the weights while loading (weight-only int8 or 4-bit)
        adapter: a LoRA adapter directory (from llama3 finetune) merged into the model
        compile: compile the decoding step with torch.compile (tens of seconds once, then faster tokens)
        json_schema: a JSON schema file: every reply is JSON valid under it (constrained decoding)
    """
    schema = None
    if json_schema is not None:
        import json
        try:
            schema = json.loads(Path(json_schema).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read the JSON schema {json_schema}: {e}") from None
    llm = load_for_inference(model, dtype, quantize, adapter, compile)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
        print(f"Chatting with {llm.name}. /reset starts over, /exit quits.", file=sys.stderr)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        messages = fit_context(llm, messages, max_new_tokens)
        reply = ""
        try:
            for delta in llm.stream_chat(messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, seed=seed, json_schema=schema):
                print(delta, end="", flush=True)
                reply += delta
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            pass
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


def load_for_inference(model: str, dtype: str | None, quantize: str | None, adapter: str | None,
                       compile: bool = False):
    from .fast import can_prepack, prepack
    from .llama import load
    if adapter and quantize:
        raise ValueError("--adapter and --quantize cannot be combined: merge the adapter first (llama3 finetune "
                         "exports merged models), then quantize")
    llm = load(model, dtype=dtype, quantize=quantize, compile=compile)
    if adapter:
        from .finetune.lora import apply_adapter
        apply_adapter(llm, adapter)
    if can_prepack(llm.model):  # fp32 on CPU: oneDNN linears (after merging an adapter: packing is final)
        prepack(llm.model)
    return llm


def fit_context(llm, messages: list[dict], reserve: int) -> list[dict]:
    """Drop the oldest turns (never the system prompt or the last message) until the prompt leaves `reserve` tokens."""
    budget = llm.args.max_seq_len - min(reserve, llm.args.max_seq_len // 2)
    while len(llm.encode_chat(messages)) > budget:
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            break
        del messages[first]
    return messages


def pull(name: str) -> None:
    """Download a known model into the cache ($LLAMA3_HOME, default ~/.cache/llama3) and print its path.

    Args:
        name: a known model name (see `llama3 models`)
    """
    from .hub import pull as pull_model
    print(pull_model(name))


def models() -> None:
    """List the known model names and where the pulled ones are."""
    from .hub import KNOWN_MODELS, local_path
    for name, spec in KNOWN_MODELS.items():
        where = local_path(name)
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:24} {where or 'not pulled'}{default}")


def convert(src: str, dst: str, *, to: Literal["hf", "meta"], shards: int = 1, dtype: str | None = None) -> None:
    """Convert a checkpoint (any readable format or known model name) to Hugging Face or Meta layout.

    Args:
        src: source checkpoint: .gguf file, Meta or HF directory, or known model name
        dst: output directory
        to: output layout
        shards: number of model-parallel shards (Meta layout only)
        dtype: cast the weights (e.g. bfloat16); default keeps them (GGUF is dequantized to float32)
    """
    from .export import export
    export(src, Path(dst), to=to, shards=shards, dtype=dtype)
    print(dst)


def merge(adapter: str, *, out: str, model: str | None = None, to: Literal["hf", "meta"] = "hf", shards: int = 1,
          dtype: str | None = None) -> None:
    """Fold a LoRA or QLoRA adapter saved by `llama3 finetune` into its base model and write the merged model
    (tokenizer and chat template included): what `llama3 chat`, `llama3 convert`, `llama3 quantize` and Hugging Face
    transformers read.

    Args:
        adapter: the adapter directory (RUN/adapter)
        out: output directory
        model: the base model (default: the one the adapter was trained on, from its adapter_config.json)
        to: output layout
        shards: number of model-parallel shards (Meta layout only)
        dtype: cast the merged weights (e.g. bfloat16); default keeps the base's
    """
    from .finetune.lora import merge_adapter
    print(merge_adapter(adapter, out, base=model, to=to, shards=shards, dtype=dtype))


VERBS = [generate, chat, pull, models, convert, quantize, bench, serve, train, finetune, merge]


# ---- parser generation -------------------------------------------------------------------------------------------

def _arg_help(doc: str) -> dict[str, str]:
    helps, in_args = {}, False
    for line in doc.splitlines():
        s = line.strip()
        if s == "Args:":
            in_args = True
        elif in_args and ":" in s:
            name, text = s.split(":", 1)
            helps[name.strip()] = text.strip()
    return helps


def _argparse_type(annotation) -> dict:
    """argparse options for one annotation: int, float, str, bool, X | None, list[X], Literal[...]."""
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _argparse_type(next(a for a in params if a is not type(None)))
    if origin is Literal:
        return {"choices": list(params), "type": type(params[0])}
    if origin is list:
        return {"nargs": "+", "type": params[0]}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


def add_verb(subparsers, fn) -> None:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0]
    parser = subparsers.add_parser(fn.__name__.replace("_", "-"), help=" ".join(summary.split()),
                                   description=doc.split("Args:")[0].strip(),
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _arg_help(doc)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        opts = _argparse_type(hints[name])
        opts["help"] = helps.get(name, " ")
        if param.kind is param.KEYWORD_ONLY:
            required = param.default is inspect.Parameter.empty
            parser.add_argument("--" + name.replace("_", "-"), dest=name, required=required,
                                **({} if required else {"default": param.default}), **opts)
        else:
            if param.default is not inspect.Parameter.empty and opts.get("nargs") == "+":
                opts.update(nargs="*", default=param.default)  # a list of positionals that may be empty
            parser.add_argument(name, **opts)
    parser.set_defaults(_fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama3", description="Llama 3: run, chat, serve, train, fine-tune and "
                                     "evaluate Llama models.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for fn in VERBS:
        add_verb(sub, fn)
    # Verb groups with sub-commands build their own parsers next to their code.
    from .data.cli import add_data_parser, cli_data
    add_data_parser(sub).set_defaults(_run=cli_data)
    from .eval.cli import add_eval_parser, cli_eval
    add_eval_parser(sub).set_defaults(_run=cli_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    args = vars(namespace)
    fn = args.pop("_fn", None)
    from .hub import PullError
    from .weights import WeightsError
    try:
        if fn is None:
            namespace._run(namespace)
        else:
            fn(**args)
    except (WeightsError, PullError, ValueError) as e:
        print(f"llama3: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
