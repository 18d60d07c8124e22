"""The fast paths of generation: oneDNN-prepacked fp32 linears and the compiled decode step."""

import pytest
import torch

from llama3.fast import PackedLinear, avx2_kernels, prepack
from llama3.generate import DecodeStep, generate_tokens
from llama3.quantize import (AVX2_KERNEL_ROWS, Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_int8,
                             quantize_model)

from conftest import random_kquant_blocks, random_model, tiny_args


pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(model, prompt, n, step=None):
    return [s[0] for s in generate_tokens(model, [prompt], max_new_tokens=n, step=step)]


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_prepacked_model_computes_the_same_logits(tied):
    model = random_model(tiny_args(tie_embeddings=tied))
    tokens = torch.randint(0, 512, (2, 20))
    expected = model(tokens)
    packed = prepack(random_model(tiny_args(tie_embeddings=tied)))
    assert all(not isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 7 + 1
    assert (packed(tokens) - expected).abs().max() <= 1e-4
    assert greedy(packed, [1, 2, 3], 12) == greedy(model, [1, 2, 3], 12)


def test_prepack_needs_an_fp32_cpu_model():
    with pytest.raises(ValueError, match="fp32 model on the CPU"):
        prepack(random_model(tiny_args()).to(torch.bfloat16))


@pytest.mark.slow  # compiles (tens of seconds on two busy cores)
@pytest.mark.parametrize("kind", ["fp32", "prepacked", "int8"])
def test_compiled_decode_step_matches_eager_without_recompiling(kind):
    model = {"fp32": lambda m: m, "prepacked": prepack, "int8": lambda m: quantize_model(m, "int8")}[kind](
        random_model(tiny_args()))
    step = DecodeStep(model, compile=True)
    assert greedy(model, [1, 2, 3], 10, step) == greedy(model, [1, 2, 3], 10)
    assert step.compile_seconds > 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Another prompt length and cache size: the same graph (kv_len and the cache length are dynamic).
    assert greedy(model, [5, 4, 3, 2, 1], 17, step) == greedy(model, [5, 4, 3, 2, 1], 17)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@torch.no_grad()
def test_prefill_from_an_empty_cache_is_plain_causal_attention():
    # Without positions the model takes the cache as empty and skips the mask (is_causal): same logits, same cache.
    from llama3.model import KVCache
    model = random_model(tiny_args())
    tokens = torch.randint(0, 512, (2, 11))
    causal_cache, masked_cache = KVCache(model.args, 2, 16), KVCache(model.args, 2, 16)
    causal = model(tokens, cache=causal_cache)
    masked = model(tokens, torch.arange(11).expand(2, 11), masked_cache)
    assert (causal - masked).abs().max() <= 1e-5 and (causal - model(tokens)).abs().max() <= 1e-5
    assert torch.equal(causal_cache.k, masked_cache.k) and torch.equal(causal_cache.v, masked_cache.v)


@pytest.mark.slow  # compiles
@torch.inference_mode()
@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_compiled_step_logits_match_eager_for_rows_at_different_positions(kind):
    # The compiled step attends by reduction (and, for a bf16 model, over a bf16 cache); the eager one through
    # torch's attention kernel over an fp32 cache. Two rows at different positions, two new tokens each.
    from llama3.model import KVCache
    model = random_model(tiny_args())
    if kind == "int4":
        model = quantize_model(model, "int4", group_size=32)
    eager, compiled = DecodeStep(model), DecodeStep(model, compile=True)
    prompt = torch.randint(0, 512, (2, 9))
    tokens, positions = torch.randint(0, 512, (2, 2)), torch.tensor([[9, 10], [5, 6]])
    logits = []
    for step in (eager, compiled):
        cache = KVCache(model.args, 2, 32, dtype=step.cache_dtype)
        model(prompt, cache=cache)
        logits.append(step(tokens, positions, cache, kv_len=11))
    assert compiled.cache_dtype == model.norm.weight.dtype  # int4: bf16 on AVX-512, fp32 on AVX2 (compute_dtype)
    # Quantized: the kernels round activations (bf16, or int8 per block of 32 on AVX2), and differently ordered sums
    # round differently
    tolerance = 1e-4 if kind == "fp32" else 5e-2
    assert (logits[0] - logits[1]).abs().max() <= tolerance * logits[0].abs().max()


@pytest.mark.parametrize("tied", [False, True])
def test_onednn_linears_match_torch_in_forward_and_backward(tied):
    from llama3.fast import OneDNNLinear, use_onednn_linears
    reference, model = random_model(tiny_args(tie_embeddings=tied)), random_model(tiny_args(tie_embeddings=tied))
    use_onednn_linears(model)
    assert sum(isinstance(m, OneDNNLinear) for m in model.modules()) == 2 * 7 + 1
    assert model.state_dict().keys() == reference.state_dict().keys()
    tokens = torch.randint(0, 512, (2, 20))
    for m in (reference, model):
        torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * p.grad.abs().max(), name


def test_onednn_linears_need_fp32_on_cpu():
    from llama3.fast import use_onednn_linears
    with pytest.raises(ValueError, match="fp32 parameters on the CPU"):
        use_onednn_linears(random_model(tiny_args()).to(torch.bfloat16))


def int8_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x rounded as the AVX2 kernels round activations: int8 per block of 32 (256 for GGUF K-quant weights), scale
    max|x| / 127."""
    blocks = x.reshape(*x.shape[:-1], -1, block)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(d > 0, d, 1)) * d).reshape(x.shape)


@pytest.mark.skipif(avx2_kernels() is None, reason="our kernels run on AVX2-only CPUs with a C compiler")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("in_features", [256, 576])  # whole 256-weight blocks, and not
def test_avx2_kernels_compute_the_dequantized_weights_on_int8_activations(scheme, in_features):
    w = torch.randn(96, in_features)
    if scheme == "int8":
        q, scales = quantize_int8(w)
        layer, dense = Int8Linear(q, scales.float()), q.float() * scales.float()[:, None]
    else:
        packed, scales, zeros = quantize_int4(w, 32)
        layer = Int4Linear(packed, scales, zeros, 32)
        dense = dequantize_int4(packed, scales.float(), zeros.float())
        # w = q * scale + (zero - 8 scale): the kernel multiplies the first part by the int8 activations and the
        # second by the exact sums of x
        offsets = (zeros.float() - 8 * scales.float()).repeat_interleave(32, dim=1)
    assert layer.kernel == "avx2"
    for rows in range(1, AVX2_KERNEL_ROWS + 2):  # the kernel's rows, then a dequantized tile's
        x = torch.randn(rows, in_features) * torch.linspace(0.1, 10, in_features)  # blocks of different ranges
        out = layer(x)
        if rows > AVX2_KERNEL_ROWS:
            expected = x @ dense.t()
        elif scheme == "int8":  # exact products of int8 activations, summed in fp32
            expected = int8_blocks(x) @ dense.t()
        else:
            expected = int8_blocks(x) @ (dense - offsets).t() + x @ offsets.t()
        assert (out - expected).abs().max() <= 1e-5 * expected.abs().max(), rows


@pytest.mark.skipif(avx2_kernels() is None, reason="our kernels run on AVX2-only CPUs with a C compiler")
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("in_features", [256, 768])
def test_kquant_kernels_compute_the_gguf_packages_weights_on_int8_activations(kind, in_features):
    import gguf
    from llama3.quantize import KQuantEmbedding, KQuantLinear
    blocks = random_kquant_blocks(kind, 72, in_features)
    dense = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[kind]))
    layer = KQuantLinear(blocks, kind, in_features)
    tokens = torch.tensor([[3, 0, 71], [5, 5, 9]])
    assert torch.equal(KQuantEmbedding(blocks, kind, in_features)(tokens), dense[tokens])  # the package's values
    for rows in range(1, AVX2_KERNEL_ROWS + 2):  # the kernel's rows, then a dequantized tile's
        x = torch.randn(rows, in_features) * torch.linspace(0.1, 10, in_features)  # blocks of different ranges
        out = layer(x)
        # the kernel's sums are exact integers of the int8 activations and the blocks' codes
        expected = (x if rows > AVX2_KERNEL_ROWS else int8_blocks(x, 256)).double() @ dense.double().t()
        assert (out - expected).abs().max() <= 1e-5 * expected.abs().max(), rows
