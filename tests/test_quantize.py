"""Weight-only int8 / int4 quantization: the math, the modules, GGUF 4-bit repacking, the on-disk format."""

import gguf
import pytest
import torch

from llama3.generate import generate_tokens
from llama3.llama import build_model
import llama3.quantize as quantize_module
from llama3.quantize import (DEQUANTIZE_ABOVE_ROWS, Int4Linear, Int8Embedding, Int8Linear, QuantizationError,
                             compute_dtype, dequantize_int4, is_layer_linear, pack_for_cpu_kernel, pack_nibbles,
                             quantize, quantize_checkpoint, quantize_int4, quantize_int8, quantize_model,
                             unpack_nibbles)
from llama3.weights import read_checkpoint
from llama3.weights.gguf import dequantize

from conftest import random_model, tiny_args, write_gguf


pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_rounds_each_weight_to_the_nearest_step():
    w = torch.randn(48, 64) * torch.linspace(0.1, 3, 48)[:, None]  # rows of very different ranges
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    s = scales.float()[:, None]
    assert ((q.float() * s - w).abs() <= s * 0.5 * (1 + 1e-5)).all()
    assert q.abs().amax(dim=1).min() >= 126  # each row uses its whole range


def test_int4_groups_round_trip():
    w = torch.randn(16, 128)
    packed, scales, zeros = quantize_int4(w, group_size=32)
    assert packed.shape == (16, 64) and scales.shape == zeros.shape == (16, 4)
    q = unpack_nibbles(packed)
    assert torch.equal(pack_nibbles(q), packed) and int(q.max()) <= 15
    err = (dequantize_int4(packed, scales.float(), zeros.float()) - w).abs()
    step = scales.float().repeat_interleave(32, dim=1)
    assert (err <= 0.5 * step * (1 + 1e-5)).all()  # half a step of the (bf16) grid


def test_int4_group_size_must_divide_the_input():
    with pytest.raises(QuantizationError, match="group size 128 does not divide the input dimension 576"):
        quantize_int4(torch.randn(8, 576), group_size=128)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_linear_equals_its_dequantized_weights(scheme):
    w, x = torch.randn(96, 64), torch.randn(2, 5, 64, dtype=torch.bfloat16)
    if scheme == "int8":
        q, scales = quantize_int8(w)
        layer, dense = Int8Linear(q, scales), q.float() * scales.float()[:, None]
    else:
        packed, scales, zeros = quantize_int4(w, 32)
        layer, dense = Int4Linear(packed, scales, zeros, 32), dequantize_int4(packed, scales.float(), zeros.float())
    out = layer(x)
    assert out.shape == (2, 5, 96) and out.dtype == torch.bfloat16
    expected = x.float() @ dense.t()
    assert (out.float() - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fp32_prompts_use_fp32_matmuls_on_dequantized_tiles(scheme, monkeypatch):
    """fp32 activations (how AVX2 CPUs run quantized models): many rows go through fp32 matmuls on the weight
    dequantized a tile at a time (exact up to summation order), decoding rows through the bf16 kernel."""
    monkeypatch.setattr(quantize_module, "_TILE_WEIGHTS", 64 * 128)  # 64-row tiles: three for 192 rows
    w = torch.randn(192, 128)
    if scheme == "int8":
        q, scales = quantize_int8(w)
        layer, dense = Int8Linear(q, scales.float()), q.float() * scales.float()[:, None]
    else:
        packed, scales, zeros = quantize_int4(w, 32)
        layer = Int4Linear(packed, scales.float(), zeros.float(), 32)
        dense = dequantize_int4(packed, scales.float(), zeros.float())
    prompt = torch.randn(1, DEQUANTIZE_ABOVE_ROWS + 1, 128)
    assert (layer(prompt) - prompt @ dense.t()).abs().max() <= 1e-5 * (prompt @ dense.t()).abs().max()
    decode = torch.randn(3, 1, 128)
    out, expected = layer(decode), decode @ dense.t()
    assert out.dtype == torch.float32 and (out - expected).abs().max() <= 0.02 * expected.abs().max()


def test_quantized_models_compute_in_this_cpus_fast_dtype():
    assert quantize_model(random_model(tiny_args()), "int8").norm.weight.dtype == compute_dtype("cpu")


def test_int8_embedding_rows():
    w = torch.randn(50, 16)
    q, scales = quantize_int8(w)
    tokens = torch.tensor([[3, 49, 0]])
    out = Int8Embedding(q, scales)(tokens)
    assert out.shape == (1, 3, 16) and (out.float() - w[tokens]).abs().max() <= 0.02 * w.abs().max()


def fake_quantized(model, scheme):
    """The fp32 model with each weight replaced by its dequantized value: what the quantized model should compute,
    up to bf16 activations."""
    ref = random_model(model.args)
    sd = {}
    for name, w in model.state_dict().items():
        if w.ndim == 1:
            sd[name] = w.bfloat16().float()
        elif scheme == "int4" and is_layer_linear(name):
            packed, scales, zeros = quantize_int4(w, 32)
            sd[name] = dequantize_int4(packed, scales.float(), zeros.float())
        else:
            q, scales = quantize_int8(w)
            sd[name] = q.float() * scales.float()[:, None]
    ref.load_state_dict(sd)
    return ref


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("tied", [False, True])
def test_quantized_model_computes_its_dequantized_weights(scheme, tied):
    model = random_model(tiny_args(tie_embeddings=tied))
    tokens = torch.randint(0, 512, (2, 24))
    qmodel = quantize_model(model, scheme)
    out, expected = qmodel(tokens), fake_quantized(model, scheme)(tokens)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() <= 0.03 * expected.abs().max()  # bf16 activations
    kinds = {type(m).__name__ for m in qmodel.modules()}
    assert "Linear" not in kinds and "Embedding" not in kinds
    if tied:  # one int8 matrix serves the embedding and the output
        assert qmodel.output.weight is qmodel.tok_embeddings.weight


@torch.no_grad()
def test_int8_logits_stay_close_to_fp32():
    model = random_model(tiny_args())
    tokens = torch.randint(0, 512, (2, 24))
    ref, out = model(tokens), quantize_model(model, "int8")(tokens)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


def test_quantized_model_generates_with_a_bf16_cache():
    qmodel = quantize_model(random_model(tiny_args()), "int4")
    steps = list(generate_tokens(qmodel, [[1, 2, 3], [4, 5]], max_new_tokens=6))
    assert len(steps) == 6 and all(len(s) == 2 for s in steps)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_4bit_blocks_are_repacked_not_requantized(tmp_path, kind):
    args = tiny_args()
    write_gguf(tmp_path / "m.gguf", args, random_model(args).state_dict(), gguf.GGMLQuantizationType[kind])
    dense = read_checkpoint(tmp_path / "m.gguf")  # dequantized to fp32 by the reader
    packed = quantize_checkpoint(read_checkpoint(tmp_path / "m.gguf", blocks=True), "int4")
    assert packed.metadata["quantization"] == {"scheme": "int4", "group_size": 32}
    for name, w in dense.state_dict.items():
        if name.startswith("layers.") and w.ndim == 2:
            base = name.removesuffix(".weight")
            back = dequantize_int4(packed.state_dict[name], packed.state_dict[f"{base}.scales"],
                                   packed.state_dict[f"{base}.zeros"])
            # The GGUF values, up to one fp32 rounding of the zero point (no second rounding to a new grid).
            assert (back - w).abs().max() <= 1e-6 * w.abs().max(), name
    tokens = torch.randint(0, args.vocab_size, (1, 16))
    ref = build_model(dense, dtype=torch.bfloat16)(tokens)
    out = build_model(packed)(tokens)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_gguf_dequantize_in_row_slices_equals_whole():
    raw = torch.from_numpy(gguf.quants.quantize(torch.randn(10, 64).numpy(), gguf.GGMLQuantizationType.Q8_0))
    whole = dequantize(raw, "Q8_0", 10)
    assert torch.equal(torch.cat([dequantize(raw[:4], "Q8_0", 4), dequantize(raw[4:], "Q8_0", 6)]), whole)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_writes_a_checkpoint_that_loads_back(tmp_path, scheme, capsys):
    from llama3.export import save_checkpoint
    args = tiny_args(tie_embeddings=True)
    model = random_model(args)
    save_checkpoint(tmp_path / "hf", args, model.state_dict(), layout="hf")
    quantize(str(tmp_path / "hf"), str(tmp_path / "q"), int8=scheme == "int8", int4=scheme == "int4")
    assert "MB" in capsys.readouterr().out
    ckpt = read_checkpoint(tmp_path / "q")
    assert ckpt.format == "quantized" and ckpt.args == read_checkpoint(tmp_path / "hf").args
    tokens = torch.randint(0, args.vocab_size, (1, 12))
    expected = quantize_model(model, scheme)(tokens)
    assert torch.equal(build_model(ckpt)(tokens), expected)


def test_a_quantized_checkpoint_is_not_quantized_again(tmp_path):
    from llama3.export import save_checkpoint
    args = tiny_args()
    save_checkpoint(tmp_path / "hf", args, random_model(args).state_dict(), layout="hf")
    quantize(str(tmp_path / "hf"), str(tmp_path / "q"), int8=True)
    assert quantize_checkpoint(read_checkpoint(tmp_path / "q"), "int8").metadata["quantization"]["scheme"] == "int8"
    with pytest.raises(QuantizationError, match="already quantized as int8"):
        quantize_checkpoint(read_checkpoint(tmp_path / "q"), "int4")


def test_quantize_needs_exactly_one_scheme(tmp_path):
    with pytest.raises(QuantizationError, match="exactly one of --int8 and --int4"):
        quantize("x", str(tmp_path / "q"), int8=True, int4=True)


def test_corrupted_quantized_config(tmp_path):
    from llama3.export import save_checkpoint
    from llama3.weights import WeightsError
    args = tiny_args()
    save_checkpoint(tmp_path / "hf", args, random_model(args).state_dict(), layout="hf")
    quantize(str(tmp_path / "hf"), str(tmp_path / "q"), int8=True)
    (tmp_path / "q" / "quantization.json").write_text('{"format": "llama3-quantized"}')
    with pytest.raises(WeightsError, match=r"quantization\.json: missing key 'args'"):
        read_checkpoint(tmp_path / "q")


@pytest.mark.parametrize("rows", [128, 96])  # 96: not a whole number of 64-row blocks, torch's converter packs it
def test_direct_int4_packing_equals_torchs_converter(rows):
    q = torch.randint(0, 16, (rows, 64), dtype=torch.uint8)
    assert torch.equal(pack_for_cpu_kernel(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
