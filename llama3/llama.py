"""`llama3.load(source)` -> `Llama`: a model with its tokenizer and chat format, ready to generate and chat."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .args import ModelArgs
from .generate import DecodeStep, SamplingParams, TextStream, generate_tokens
from .hub import resolve
from .model import Transformer, meta_model
from .weights import Checkpoint, WeightsError, check_state_dict, read_checkpoint


def build_model(ckpt: Checkpoint, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                source: str = "") -> Transformer:
    """Create the model on the meta device and adopt the checkpoint's tensors, so no weights exist twice."""
    quantization = ckpt.metadata.get("quantization")
    if quantization:  # portable quantized tensors (llama3/quantize.py): quantized modules
        from .quantize import build_quantized_model
        return build_quantized_model(ckpt.args, ckpt.state_dict, group_size=quantization["group_size"],
                                     device=device, dtype=dtype)
    model = meta_model(ckpt.args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if ckpt.args.tie_embeddings:
        expected.pop("output.weight")
    check_state_dict(ckpt.state_dict, expected, source or ckpt.format)
    if dtype is None:
        dtype = ckpt.state_dict["tok_embeddings.weight"].dtype
        if not dtype.is_floating_point or dtype == torch.float16 and torch.device(device).type == "cpu":
            dtype = torch.float32
    state = {k: v.to(device=device, dtype=dtype) for k, v in ckpt.state_dict.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if ckpt.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval().requires_grad_(False)


class Llama:
    def __init__(self, model: Transformer, tokenizer, chat_format=None, name: str = "", compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.name = name
        self.decode_step = DecodeStep(model, compile=compile)  # compiled on first use when asked

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, bos=getattr(self.tokenizer, "add_bos", True))

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """OpenAI-style messages (tool calls and "tool" results included) -> prompt ids; `tools` are OpenAI function
        definitions the model may call (llama3/tools.py)."""
        if self.chat_format is None:
            raise ValueError(f"{self.name or 'this model'} has no chat format (no chat template in the checkpoint)")
        return self.chat_format.encode_dialog_prompt(messages, tools=tools)

    @torch.inference_mode()
    def embed(self, inputs: list[str | list[int]], normalize: bool = True) -> list[list[float]]:
        """One vector per text (or token ids): the mean over its tokens of the last layer's normalised hidden
        states (llama-server's `--pooling mean`), scaled to unit length unless normalize=False."""
        vectors = []
        for item in inputs:
            ids = self.encode_prompt(item) if isinstance(item, str) else list(item)
            captured = []
            hook = self.model.layers[-1].register_forward_hook(lambda module, args, out: captured.append(out))
            try:  # logits for one position only: the hidden states are what is wanted
                self.model(torch.tensor([ids], device=self.model.norm.weight.device), logits_index=torch.tensor([0]))
            finally:
                hook.remove()
            vector = self.model.norm(captured[0][0]).float().mean(dim=0)  # (dim,)
            if normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            vectors.append(vector.tolist())
        return vectors

    def stream_batch(self, prompt_ids: list[list[int]], *, max_new_tokens: int = 256, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                     stop: list[str] | str | None = None, json_schema: dict | str | None = None,
                     regex: str | None = None, grammar: str | None = None) -> Iterator[list[str]]:
        """Decode prompts together; yield each prompt's new text (maybe empty) after every step. `json_schema`,
        `regex` or `grammar` (Lark, as llguidance reads it) constrains every prompt's output (llama3/constrain.py)."""
        stops = [stop] if isinstance(stop, str) else stop or ()
        streams = [TextStream(self.tokenizer, stops) for _ in prompt_ids]
        finished = [False] * len(prompt_ids)
        params = SamplingParams(temperature, top_p, top_k, seed)
        constraints = None
        if json_schema is not None or regex is not None or grammar is not None:
            from .constrain import Constraint, grammar_for
            compiled = grammar_for(json_schema=json_schema, regex=regex, grammar=grammar)
            constraints = [Constraint(self.tokenizer, compiled) for _ in prompt_ids]
        for step in generate_tokens(self.model, prompt_ids, max_new_tokens=max_new_tokens, params=params,
                                    stop_ids=self.tokenizer.stop_ids, step=self.decode_step,
                                    constraints=constraints):
            deltas = [""] * len(prompt_ids)
            for i, token in enumerate(step):
                if token is None or finished[i]:
                    continue
                if token in self.tokenizer.stop_ids:  # end of turn: not part of the text
                    finished[i] = True
                else:
                    deltas[i] = streams[i].push(token)
                    finished[i] = streams[i].stopped
            yield deltas
            if all(finished):
                break
        yield [s.finish() for s in streams]

    def stream_ids(self, prompt_ids: list[int], **kwargs) -> Iterator[str]:
        """Text increments of one completion as they are generated."""
        for (delta,) in self.stream_batch([prompt_ids], **kwargs):
            if delta:
                yield delta

    def complete_ids(self, prompt_ids: list[list[int]], **kwargs) -> list[str]:
        texts = [""] * len(prompt_ids)
        for deltas in self.stream_batch(prompt_ids, **kwargs):
            texts = [t + d for t, d in zip(texts, deltas)]
        return texts

    def generate(self, prompts: str | list[str], **kwargs) -> str | list[str]:
        """Raw completions; a list of prompts is decoded together as one batch. Keyword arguments: max_new_tokens,
        temperature (0 = greedy), top_p, top_k, seed, stop (a string or list of strings), and one constraint on
        the output: json_schema (a dict or JSON text), regex, or grammar (Lark)."""
        single = isinstance(prompts, str)
        texts = self.complete_ids([self.encode_prompt(p) for p in ([prompts] if single else prompts)], **kwargs)
        return texts[0] if single else texts

    def chat(self, messages: list[dict], **kwargs) -> str:
        """The assistant's reply to OpenAI-style messages [{"role": ..., "content": ...}]."""
        return self.complete_ids([self.encode_chat(messages)], **kwargs)[0]

    def stream_chat(self, messages: list[dict], **kwargs) -> Iterator[str]:
        return self.stream_ids(self.encode_chat(messages), **kwargs)


def load(source: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu", *,
         quantize: str | None = None, group_size: int = 32, compile: bool = False, prepack: bool = False,
         cache: bool = True) -> Llama:
    """Load a Meta directory, HF directory, .gguf file, llama3 quantized directory, or a known model name (pulled
    on first use). quantize="int8" or "int4" quantizes the weights while loading (GGUF 4-bit blocks are kept as
    they are); the model then computes in bf16, or in fp32 on CPUs without fast bf16 (AVX2-only:
    quantize.compute_dtype). compile=True compiles the decoding step with torch.compile on
    first use (tens of seconds once; faster tokens after). prepack=True reorders an fp32 CPU model's linear
    weights for oneDNN (llama3/fast.py: faster prompts and speculative checks; inference only; no effect on other
    dtypes, devices or quantized models). cache=True keeps what loading a GGUF file for the CPU converted (the
    model's tensors as built, the tokenizer) under $LLAMA3_HOME/converted, so that later loads of the unchanged file
    with the same options memory-map it (llama3/weights/cache.py)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = resolve(source)
    store = _converted_cache(path, dtype, device, quantize, group_size) if cache else None
    cached = store.load(_restore) if store else None
    if cached:
        model, tokenizer, template = cached
    else:
        if quantize:
            from .quantize import quantize_checkpoint
            ckpt = quantize_checkpoint(read_checkpoint(path, blocks=True), quantize, group_size,
                                       keep_blocks=_kquant_kernels(device))
        else:
            ckpt = read_checkpoint(path)
        if ckpt.tokenizer is None:
            raise WeightsError(f"{path}: no tokenizer found next to the weights")
        tokenizer, template = ckpt.tokenizer, ckpt.chat_template
        model = build_model(ckpt, dtype, device, str(path))
        if store and hasattr(tokenizer, "cache_state"):
            store.save(_snapshot(model, tokenizer, template))
    if prepack:
        from .fast import can_prepack, prepack as prepack_linears
        if can_prepack(model):
            prepack_linears(model)
    from .tokenizer import chat_format_for
    chat_format = chat_format_for(tokenizer, template)
    return Llama(model, tokenizer, chat_format, name=str(source) if isinstance(source, str) else Path(source).name,
                 compile=compile)


def _kquant_kernels(device) -> bool:
    """Whether int4 keeps GGUF Q4_K / Q6_K tensors as their blocks: on CPUs where our AVX2 kernels run
    (llama3/quantize.py KQuantLinear); elsewhere they are repacked into the portable int4 / int8 forms."""
    from .fast import avx2_kernels
    return torch.device(device).type == "cpu" and avx2_kernels() is not None


def _converted_cache(path: Path, dtype, device, quantize: str | None, group_size: int):
    """The cache entry for loading this file so, if it is a GGUF file loaded for the CPU (the formats whose loading
    converts; safetensors and Meta checkpoints are memory-mapped as they are)."""
    from .weights import detect_format
    from .weights.cache import ConvertedCache
    if torch.device(device).type != "cpu" or not path.is_file() or detect_format(path) != "gguf":
        return None
    from .hub import home
    from .fast import avx2_kernels  # whether quantized modules were built in our kernels' layout
    options = {"dtype": str(dtype), "quantize": quantize, "group_size": group_size if quantize else None,
               "kernels": "avx2 gguf-blocks" if quantize and avx2_kernels() else "torch"}
    return ConvertedCache(home() / "converted", path, options)


def _snapshot(model: Transformer, tokenizer, chat_template: str | None) -> dict:
    """The built model's tensors (quantized modules with their kernel layouts), what rebuilds it around them, and
    the tokenizer's tables."""
    from .quantize import QUANTIZED_MODULES, module_state
    modules = {name: module_state(m) for name, m in model.named_modules()
               if type(m).__name__ in QUANTIZED_MODULES}
    inside = tuple(f"{name}." for name in modules)
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith(inside)}
    return {"args": model.args.to_dict(), "chat_template": chat_template, "modules": modules, "tensors": tensors,
            "tokenizer": {"kind": type(tokenizer).__name__, "state": tokenizer.cache_state()}}


def _restore(snapshot: dict) -> tuple[Transformer, object, str | None]:
    from .quantize import restore_module
    from .tokenizer import BPETokenizer
    if snapshot["tokenizer"]["kind"] != BPETokenizer.__name__:
        raise WeightsError(f"tokenizer kind {snapshot['tokenizer']['kind']!r}")
    tokenizer = BPETokenizer.from_cache_state(snapshot["tokenizer"]["state"])
    model = meta_model(ModelArgs.from_dict(snapshot["args"]))
    for name, state in snapshot["modules"].items():
        model.set_submodule(name, restore_module(state))
    model.load_state_dict(snapshot["tensors"], strict=False, assign=True)
    if model.args.tie_embeddings and "output" not in snapshot["modules"]:
        model.output.weight = model.tok_embeddings.weight
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise WeightsError(f"tensors missing: {missing[:5]}")
    return model.eval().requires_grad_(False), tokenizer, snapshot["chat_template"]
