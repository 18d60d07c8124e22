import os

import pytest
import torch

from llama3.args import ModelArgs
from llama3.model import Transformer


def tiny_args(**overrides) -> ModelArgs:
    """A random-weight model small enough for every test: GQA (4 heads, 2 kv heads), 2 layers."""
    return ModelArgs.preset("debug-tiny", **overrides)


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.1)
    with torch.no_grad():  # non-trivial norm weights so a wrongly mapped norm cannot pass unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def default_gguf_path():
    """The default model's GGUF file, pulled into the cache on first use (set LLAMA3_OFFLINE=1 to skip instead)."""
    from llama3 import hub
    path = hub.local_path(hub.DEFAULT_MODEL)
    if path is None:
        if os.environ.get("LLAMA3_OFFLINE"):
            pytest.skip("default model not pulled and LLAMA3_OFFLINE is set")
        path = hub.pull(hub.DEFAULT_MODEL)
    return path


@pytest.fixture(scope="session")
def default_llm(default_gguf_path):
    """The default model loaded once for every test module that serves or samples it."""
    import llama3
    from llama3.hub import DEFAULT_MODEL
    return llama3.load(DEFAULT_MODEL)  # by name: the server then calls it by its known name


def save_tiny_chat_model(path, gguf_path, tie_embeddings: bool = True):
    """A random 2-layer model with the default model's tokenizer (49152 tokens) and ChatML template, in HF layout."""
    from llama3.export import save_checkpoint
    from llama3.tokenizer import BPETokenizer
    tokenizer = BPETokenizer.from_gguf(gguf_path)
    args = ModelArgs.preset("debug-tiny", vocab_size=49152, tie_embeddings=tie_embeddings, max_seq_len=512)
    save_checkpoint(path, args, random_model(args).state_dict(), tokenizer=tokenizer,
                    chat_template=tokenizer.chat_template)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_gguf_path):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny"), default_gguf_path)


@pytest.fixture
def one_thread():
    """Tiny models decode faster on one thread, and much faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_kquant_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """(rows, bytes per row) of random GGUF super-blocks: every bit pattern of codes and scales, finite fp16 d."""
    import numpy as np
    rng = np.random.default_rng(seed)
    size = {"Q4_K": 144, "Q6_K": 210}[kind]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for at in (0, 2) if kind == "Q4_K" else (208,):  # d (and Q4_K's dmin)
        raw[..., at:at + 2] = (rng.standard_normal(raw.shape[:2]) * 0.01).astype(np.float16)[..., None].view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1))


# ---- GGUF files as llama.cpp makes them ---------------------------------------------------------------------------

GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
GGUF_LAYER = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base in GGUF_NAMES:
        return f"{GGUF_NAMES[base]}.{suffix}"
    _, i, rest = base.split(".", 2)
    return f"blk.{i}.{GGUF_LAYER[rest]}.{suffix}"


def write_gguf(path, args, state_dict, qtype=None, tokenizer=None, rope_freqs=None):
    """A llama GGUF as llama.cpp's converter writes it: 2-D weights in `qtype` (quantized by the gguf package;
    default Q8_0), norms in F32; `tokenizer` is a dict of tokenizer.ggml.* fields (tokens, types, merges, pre, ...)."""
    import gguf
    qtype = gguf.GGMLQuantizationType.Q8_0 if qtype is None else qtype
    w = llama_gguf_writer(path, args, qtype, tokenizer)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.float().numpy())
    for name, t in state_dict.items():
        if args.tie_embeddings and name == "output.weight":
            continue
        data = t.float().numpy()
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_gguf_writer(path, args, qtype, tokenizer=None):
    """A gguf.GGUFWriter holding a llama model's metadata (and tokenizer.ggml.* fields), tensors still to add."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    file_types = {gguf.GGMLQuantizationType.F32: 0, gguf.GGMLQuantizationType.F16: 1}
    w.add_file_type(file_types.get(qtype, 7))
    if tokenizer is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer["pre"])
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer["types"])
        w.add_token_merges(tokenizer["merges"])
        w.add_bos_token_id(tokenizer["bos"])
        w.add_eos_token_id(tokenizer["eos"])
        w.add_chat_template(tokenizer["chat_template"])
    return w


@pytest.fixture(scope="session")
def llama3_hf_tokenizer():
    return hf_tokenizer_of_meta_llama3()


def hf_tokenizer_of_meta_llama3():
    """Llama 3's tokenizer as a Hugging Face `tokenizers.Tokenizer`, made by transformers' own converter from Meta's
    tokenizer.model (what meta-llama ships as tokenizer.json)."""
    import importlib
    import importlib.resources

    from llama3.tokenizer import LLAMA3_SPECIAL_TOKENS, load_tiktoken_ranks
    tokenizers = pytest.importorskip("tokenizers")
    converter = importlib.import_module("transformers.convert_slow_tokenizer")
    ranks = load_tiktoken_ranks((importlib.resources.files("llama_models.llama3") / "tokenizer.model").read_bytes(), "")

    class Converter(converter.TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _: ranks)

    hf = Converter(vocab_file="tokenizer.model", extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
    hf.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])
    return hf


def llama3_gguf_tokenizer(hf) -> dict:
    """The tokenizer.ggml.* fields llama.cpp's converter writes for Llama 3 (pre-tokenizer llama-bpe, no
    add_bos_token, as in early conversions)."""
    import json

    import gguf
    data = json.loads(hf.to_str())
    by_id = {i: t for t, i in data["model"]["vocab"].items()} | {t["id"]: t["content"] for t in data["added_tokens"]}
    special = {t["id"] for t in data["added_tokens"]}
    return {"pre": "llama-bpe", "tokens": [by_id[i] for i in range(len(by_id))],
            "types": [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(by_id))],
            "merges": [" ".join(m) for m in data["model"]["merges"]], "bos": 128000, "eos": 128009,
            "chat_template": LLAMA3_CHAT_TEMPLATE}


# The chat template of meta-llama/Meta-Llama-3-8B-Instruct.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def llama_cpp_quantize(src, dst, file_type: str):
    """Quantize a GGUF file with llama.cpp's own quantizer (its type mixes: Q4_K_M puts Q6_K on the output ...)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a dev extra) is not installed")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {file_type}")
    return dst
