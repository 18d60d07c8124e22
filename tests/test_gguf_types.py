"""Every GGUF tensor type: values equal to the gguf package's own reader + dequantizer, llama.cpp-quantized files of
the Llama 3 vocabulary that load and generate as exact fp32 math on their weights, Q4_K kept as int4 codes."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

import llama3
from llama3.args import ModelArgs, RopeScaling
from llama3.generate import generate_tokens
from llama3.llama import build_model
from llama3.model import Transformer, rope_frequencies
from llama3.fast import avx2_kernels
from llama3.quantize import KQuantEmbedding, KQuantLinear, dequantize_int4, is_layer_linear, quantize_checkpoint
from llama3.weights import WeightsError, read_checkpoint
from llama3.weights.gguf import GGUFFile, read_tensor, supported_types

from conftest import gguf_name, llama3_gguf_tokenizer, llama_cpp_quantize, random_model, tiny_args, write_gguf

BLOCK_TYPES = [t for t in supported_types() if t not in ("F32", "F16", "BF16")]


def test_the_types_people_download_are_supported():
    assert {"Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q8_0", "Q4_0",
            "Q4_1"} <= set(BLOCK_TYPES)


def test_every_type_equals_the_gguf_packages_own_reading(tmp_path):
    """One tensor of random blocks per type (so every bit pattern of codes and scales occurs), read by us and by the
    gguf package's GGUFReader + gguf.quants.dequantize."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(tmp_path / "types.gguf"), "llama")
    for kind in BLOCK_TYPES:
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        raw = rng.integers(0, 256, (3, 512 // block_size * block_bytes), dtype=np.uint8)
        writer.add_tensor(kind, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[kind])
    bf16 = rng.integers(0, 256, (3, 128), dtype=np.uint8)
    writer.add_tensor("BF16", bf16, raw_shape=bf16.shape, raw_dtype=GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(tmp_path / "types.gguf").tensors
    with np.errstate(all="ignore"):  # random scales include inf and nan: they must match too
        for t in GGUFReader(tmp_path / "types.gguf").tensors:
            expected = gguf_dequantize(t.data, t.tensor_type)
            got = read_tensor(ours[t.name])
            assert ours[t.name].kind == t.tensor_type.name and tuple(got.shape) == expected.shape, t.name
            np.testing.assert_array_equal(got.float().numpy(), expected, err_msg=t.name)


def test_a_type_we_cannot_read_is_named(tmp_path):
    args = tiny_args()
    write_gguf(tmp_path / "m.gguf", args, random_model(args).state_dict(), GGMLQuantizationType.Q8_0)
    data = (tmp_path / "m.gguf").read_bytes()
    # Retype the first Q8_0 tensor as Q8_1 (ggml type 9): llama.cpp has it, the gguf package cannot dequantize it.
    reader = GGUFReader(tmp_path / "m.gguf")
    t = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q8_0)
    type_field = t.field.parts[-2]  # the tensor info's uint32 type
    offset = int(type_field.ctypes.data - reader.data.ctypes.data)
    patched = bytearray(data)
    patched[offset:offset + 4] = int(GGMLQuantizationType.Q8_1).to_bytes(4, "little")
    (tmp_path / "m.gguf").write_bytes(bytes(patched))
    with pytest.raises(WeightsError, match=rf"{t.name} has type Q8_1, which cannot be read; supported: .*Q6_K"):
        read_checkpoint(tmp_path / "m.gguf")


# ---- files made by llama.cpp's quantizer ---------------------------------------------------------------------------

# Llama 3's vocabulary (128256 tokens, llama-bpe) at the smallest width K-quants allow (rows of 256 weights), tied
# embeddings and Llama 3.2's scaled RoPE as llama.cpp stores it (a rope_freqs tensor).
LLAMA3_TINY = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, hidden_dim=512,
                        rope_scaling=RopeScaling(factor=32.0), max_seq_len=131072, tie_embeddings=True)
LLAMA3_FILE_TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]
# The other mixes, on a small untied vocabulary (llama.cpp puts Q6_K on output.weight).
SMALL = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512, tie_embeddings=False)
SMALL_FILE_TYPES = ["Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "IQ4_NL", "IQ4_XS"]


@pytest.fixture(scope="session")
def llama3_ggufs(tmp_path_factory, llama3_hf_tokenizer):
    """{file type: path}: an F16 file written with the gguf package and llama.cpp's quantizations of it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (a dev extra) is not installed")
    folder = tmp_path_factory.mktemp("llama3-gguf")
    rope_freqs = rope_frequencies(replace(LLAMA3_TINY, rope_scaling=None)) / rope_frequencies(LLAMA3_TINY)
    f16 = write_gguf(folder / "F16.gguf", LLAMA3_TINY, random_model(LLAMA3_TINY).state_dict(),
                     GGMLQuantizationType.F16, tokenizer=llama3_gguf_tokenizer(llama3_hf_tokenizer),
                     rope_freqs=rope_freqs)
    return {"F16": f16, **{t: llama_cpp_quantize(f16, folder / f"{t}.gguf", t) for t in LLAMA3_FILE_TYPES}}


@pytest.fixture(scope="session")
def small_ggufs(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (a dev extra) is not installed")
    folder = tmp_path_factory.mktemp("small-gguf")
    f32 = write_gguf(folder / "F32.gguf", SMALL, random_model(SMALL).state_dict(), GGMLQuantizationType.F32)
    return {t: llama_cpp_quantize(f32, folder / f"{t}.gguf", t) for t in SMALL_FILE_TYPES}


def reference_weights(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Meta-named fp32 tensors: each tensor's bytes in the file dequantized by gguf.quants.dequantize; and each
    GGUF tensor's type. (Our directory parser is checked against the gguf package's GGUFReader above; that reader
    takes half a minute on a 128k-token vocabulary.)"""
    meta_names = {gguf_name(k): k for k in Transformer(replace(LLAMA3_TINY, vocab_size=8)).state_dict()}
    data = np.memmap(path, np.uint8, mode="r")
    weights, kinds = {}, {}
    for t in GGUFFile(path).tensors.values():
        kinds[t.name] = t.kind
        if t.name != "rope_freqs.weight":
            raw = np.array(data[t.offset:t.offset + t.nbytes]).reshape(t.shape[0] if len(t.shape) > 1 else 1, -1)
            w = gguf_dequantize(raw, GGMLQuantizationType[t.kind])
            weights[meta_names[t.name]] = torch.from_numpy(np.array(w, np.float32)).reshape(t.shape)
    return weights, kinds


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache), the plain reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


EXPECTED_TYPES = {"F16": {"F16"}, "Q8_0": {"Q8_0"}, "Q4_0": {"Q4_0", "Q6_K"}, "Q4_K_M": {"Q4_K", "Q6_K"},
                  "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"}}


@pytest.mark.parametrize("file_type", ["F16", *LLAMA3_FILE_TYPES])
def test_llama_cpp_files_load_as_their_dequantized_weights(llama3_ggufs, file_type, one_thread):
    path = llama3_ggufs[file_type]
    reference, kinds = reference_weights(path)
    assert EXPECTED_TYPES[file_type] <= set(kinds.values())  # e.g. Q4_0 files keep the (tied) embedding in Q6_K
    llm = llama3.load(path)
    assert replace(llm.args, norm_eps=1e-5) == LLAMA3_TINY and llm.args.norm_eps == np.float32(1e-5)  # stored as f32
    for name, w in llm.model.state_dict().items():
        if name != "output.weight":
            assert torch.equal(w, reference[name]), name
    prompt = llm.encode_prompt("The capital of France is")
    assert prompt[0] == 128000  # llama.cpp adds bos for llama-bpe when the file does not say
    model = Transformer(LLAMA3_TINY)
    model.load_state_dict(reference, strict=False)
    model.output.weight = model.tok_embeddings.weight
    expected = greedy(model.eval(), prompt, 6)
    ours = [step[0] for step in generate_tokens(llm.model, [prompt], max_new_tokens=6)]
    assert ours == expected


def test_q4_k_stays_int4_and_q6_k_int8(llama3_ggufs):
    """quantize="int4" keeps Q4_K's codes (repacked, not re-rounded) and the file's Q6_K tensors at int8."""
    reference, types = reference_weights(llama3_ggufs["Q4_K_M"])
    ckpt = quantize_checkpoint(read_checkpoint(llama3_ggufs["Q4_K_M"], blocks=True), "int4")
    sd = ckpt.state_dict
    kept = {"Q4_K": 0, "Q6_K": 0}
    for name, w in reference.items():
        if not is_layer_linear(name):
            continue
        base = name.removesuffix(".weight")
        kind = types[gguf_name(name)]
        if kind == "Q4_K":
            back = dequantize_int4(sd[name], sd[f"{base}.scales"], sd[f"{base}.zeros"])
            assert (back - w).abs().max() <= 1e-6 * w.abs().max(), name
        else:
            assert kind == "Q6_K" and sd[name].dtype == torch.int8 and f"{base}.zeros" not in sd, name
        kept[kind] += 1
    assert kept["Q4_K"] and kept["Q6_K"]
    tokens = torch.randint(0, LLAMA3_TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    model = Transformer(LLAMA3_TINY)
    model.load_state_dict(reference, strict=False)
    model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        ref = model.eval()(tokens)
    out = build_model(ckpt)(tokens).float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.skipif(avx2_kernels() is None, reason="the file's blocks are kept on AVX2-only CPUs with a C compiler")
def test_q4_k_m_keeps_the_files_blocks_on_avx2(llama3_ggufs, tmp_path, monkeypatch, one_thread):
    """int4 on AVX2: Q4_K and Q6_K tensors are multiplied as the file stores them, the tied Q6_K embedding is one
    copy for the lookup and the output; prompts compute the dequantized fp32 math, decoding the same on int8
    activations; the conversion cache gives the same model back."""
    monkeypatch.setenv("LLAMA3_HOME", str(tmp_path))
    path = llama3_ggufs["Q4_K_M"]
    reference, types = reference_weights(path)
    model = Transformer(LLAMA3_TINY)  # the quantized schemes keep norms in bf16
    model.load_state_dict({k: v.bfloat16().float() if v.ndim == 1 else v for k, v in reference.items()}, strict=False)
    model.output.weight = model.tok_embeddings.weight
    model.eval()
    llm = llama3.load(path, quantize="int4")
    ours = llm.model
    for name, module in ours.named_modules():
        if is_layer_linear(f"{name}.weight"):
            assert isinstance(module, KQuantLinear) and module.kind == types[gguf_name(f"{name}.weight")], name
    assert isinstance(ours.tok_embeddings, KQuantEmbedding) and ours.tok_embeddings.kind == "Q6_K"
    assert ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.randint(0, LLAMA3_TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(tokens), ours(tokens)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()  # prompt rows: fp32 tiles of the file's values
    prompt = llm.encode_prompt("The capital of France is")
    decoded = [step[0] for step in generate_tokens(ours, [prompt], max_new_tokens=6)]
    assert decoded == greedy(model, prompt, 6)
    monkeypatch.setattr(llama3.llama, "read_checkpoint", lambda *a, **k: pytest.fail("converted again"))
    again = llama3.load(path, quantize="int4").model  # from the conversion cache
    assert isinstance(again.output, KQuantLinear) and again.output.weight is again.tok_embeddings.weight
    assert [step[0] for step in generate_tokens(again, [prompt], max_new_tokens=6)] == decoded


@pytest.mark.parametrize("file_type", SMALL_FILE_TYPES)
def test_other_llama_cpp_mixes_load_as_their_dequantized_weights(small_ggufs, file_type):
    reference, kinds = reference_weights(small_ggufs[file_type])
    assert file_type.removesuffix("_M") in kinds.values()
    ckpt = read_checkpoint(small_ggufs[file_type])
    assert replace(ckpt.args, norm_eps=1e-5) == SMALL and ckpt.state_dict.keys() == reference.keys()
    for name, w in reference.items():
        assert torch.equal(ckpt.state_dict[name].float(), w), name


LLAMA_CPP_TEXTS = ["The capital of France is", "  leading spaces\tand\ttabs\n\n", "numbers 1234567 and 3.14",
                   "emoji 🎉👍🏽 and 世界", " " * 30_000, "x" + " " * 30_000 + "y", "a" * 30_000,
                   "<|eot_id|> is text here"]


def test_ids_equal_llama_cpps_and_hfs(llama3_ggufs, llama3_hf_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    theirs = llama_cpp.Llama(str(llama3_ggufs["F16"]), vocab_only=True, verbose=False)
    ours = read_checkpoint(llama3_ggufs["F16"]).tokenizer
    for text in LLAMA_CPP_TEXTS:  # special-token names are text unless allowed, as with llama.cpp's special=False
        assert ours.encode(text, bos=ours.add_bos) == theirs.tokenize(text.encode(), add_bos=True), text[:40]
        ids = ours.encode(text, bos=ours.add_bos, allowed_special="all")
        assert ids == theirs.tokenize(text.encode(), add_bos=True, special=True), text[:40]
        assert ids == llama3_hf_tokenizer.encode(text).ids, text[:40]
