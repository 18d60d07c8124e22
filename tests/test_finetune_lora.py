"""LoRA adapters, the 4-bit base of QLoRA, and the DPO loss, on tiny random models."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model, tiny_args
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llama3.finetune.dpo import dpo_loss, sequence_logps
from llama3.finetune.lora import (
    AdapterError,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    add_lora,
    apply_adapter,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from llama3.finetune.qlora import Linear4bit, dequantize_4bit, nf4_levels, quantize_4bit
from llama3.train.metrics import flops_per_token, matmul_params

TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def trained_lora(quant=None, targets="all", seed=0):
    """A tiny model with adapters whose B is not zero, as after some training."""
    model = random_model(tiny_args())
    add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=targets), quant=quant)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.weight.normal_(0, 0.05)
    return model.eval()


def test_a_fresh_adapter_leaves_the_model_unchanged_and_only_adapters_train():
    model = random_model(tiny_args())
    before = model(TOKENS)
    names = add_lora(model, LoRAConfig(rank=4, dropout=0.0))
    assert len(names) == 2 * 7  # 2 layers x (wq wk wv wo w1 w2 w3)
    assert torch.equal(model(TOKENS), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}.weight" for n in names for ab in ("lora_a", "lora_b")}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(TOKENS).flatten(0, 1), TOKENS.flatten()).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not torch.equal(model(TOKENS), before)


@pytest.mark.parametrize("targets, per_layer", [("attention", 4), ("mlp", 3), ("wq,wv", 2), ("attention,w2", 5)])
def test_target_modules(targets, per_layer):
    model = random_model(tiny_args())
    names = add_lora(model, LoRAConfig(targets=targets))
    assert len(names) == 2 * per_layer
    assert isinstance(model.output, nn.Linear)  # the output projection (tied or not) is never wrapped


def test_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="unknown target 'q_proj'"):
        add_lora(random_model(tiny_args()), LoRAConfig(targets="q_proj"))


@pytest.mark.parametrize("quant", [None, "nf4", "int4"])
def test_merged_equals_unmerged(quant):
    model = trained_lora(quant)
    unmerged = model(TOKENS)
    merge_lora(model)
    assert not lora_layers(model) and all(type(m) is not Linear4bit for m in model.modules())
    assert set(model.state_dict()) == set(random_model(tiny_args()).state_dict())  # Meta's names again
    assert (model(TOKENS) - unmerged).abs().max() < 1e-5


def test_disabled_adapters_give_the_base_model():
    model = trained_lora()
    base = random_model(tiny_args())(TOKENS)
    with adapters_disabled(model):
        assert torch.equal(model(TOKENS), base)
    assert not torch.allclose(model(TOKENS), base)


def test_adapter_round_trip(tmp_path):
    model = trained_lora(targets="attention,w2")
    save_adapter(tmp_path / "a", adapter_state_dict(model), LoRAConfig(rank=4, alpha=8, targets="attention,w2"),
                 base_model="tiny")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh = random_model(tiny_args())
    cfg = load_adapter(fresh, tmp_path / "a")
    assert (cfg.rank, cfg.alpha, cfg.targets) == (4, 8, "attention,w2")
    assert torch.equal(fresh.eval()(TOKENS), model(TOKENS))


def test_apply_adapter_merges_into_a_loaded_model(tmp_path):
    class Loaded:  # what llama3.load returns, as far as apply_adapter cares
        model = random_model(tiny_args())
    model = trained_lora()
    save_adapter(tmp_path, adapter_state_dict(model), LoRAConfig(rank=4, alpha=8))
    llm = apply_adapter(Loaded(), tmp_path)
    assert not lora_layers(llm.model)
    assert (llm.model(TOKENS) - model(TOKENS)).abs().max() < 1e-5


def test_adapter_for_another_model_is_refused(tmp_path):
    model = trained_lora()
    save_adapter(tmp_path, adapter_state_dict(model), LoRAConfig(rank=4, alpha=8))
    with pytest.raises(AdapterError, match="has shape .*was it trained on another base model"):
        load_adapter(random_model(tiny_args(dim=128)), tmp_path)
    with pytest.raises(AdapterError, match="does not fit this model: missing"):
        load_adapter(random_model(tiny_args(n_layers=3)), tmp_path)
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_adapter(random_model(tiny_args()), tmp_path / "nowhere")
    (tmp_path / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="adapter.safetensors"):
        load_adapter(random_model(tiny_args()), tmp_path)


def test_lora_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(16, 8, bias=False), rank=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


# ---- 4-bit weights -------------------------------------------------------------------------------------------------

def test_nf4_levels():
    levels = nf4_levels()
    assert levels.shape == (16,) and torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7
    # Quantiles of a normal: the levels are densest near zero.
    gaps = levels[1:] - levels[:-1]
    assert gaps[7] < gaps[0] and gaps[7] < gaps[-1]


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_4bit_round_trip_error_and_size(kind):
    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.02  # 19200 values: 300 blocks of 64, the last one partly padding
    packed, scales = quantize_4bit(w, kind, 64)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2 and scales.numel() == 300
    restored = dequantize_4bit(packed, scales, kind, w.shape)
    blocks = F.pad(w.flatten(), (0, -w.numel() % 64)).view(-1, 64)
    step = blocks.abs().amax(1, keepdim=True) * (0.33 if kind == "nf4" else 1 / 7)  # widest gap between levels
    err = F.pad((restored - w).flatten(), (0, -w.numel() % 64)).view(-1, 64).abs()
    assert torch.all(err <= step / 2 + 1e-6)
    assert (restored - w).abs().mean() / w.abs().mean() < 0.12


def test_int4_is_exact_on_its_grid():
    """Values that are integers -7..7 times a scale exact in fp16, with 7 in every block: restored exactly."""
    scale = 2.0 ** -7
    codes = torch.randint(-7, 8, (4, 32), generator=torch.Generator().manual_seed(0)).float()
    codes[:, 0] = 7
    w = codes * scale
    packed, scales = quantize_4bit(w, "int4", 32)
    assert torch.equal(scales.float().flatten(), torch.full((4,), scale))
    assert torch.equal(dequantize_4bit(packed, scales, "int4", w.shape), w)


def test_4bit_linear_gradients_match_a_plain_matmul():
    torch.manual_seed(0)
    layer = Linear4bit(torch.randn(48, 64) * 0.1, "nf4")
    w = layer.dequantize()
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(y, x @ w.T, atol=1e-6)
    assert torch.allclose(x.grad, grad @ w, atol=1e-6)
    assert [n for n, _ in layer.named_parameters()] == []  # codes and scales are buffers: never trained


def test_qlora_model_stores_the_blocks_in_4_bits():
    model = trained_lora("nf4")
    linear_weights = sum(m.packed.numel() for m in model.modules() if isinstance(m, Linear4bit))
    full = random_model(tiny_args())
    fp32_weights = sum(p.numel() for n, p in full.named_parameters() if n.startswith("layers.") and p.ndim == 2)
    assert linear_weights * 2 == fp32_weights  # two codes per byte, every block projection quantized


# ---- DPO loss ------------------------------------------------------------------------------------------------------

def test_sequence_logps_sums_only_learned_tokens():
    logits = torch.randn(2, 4, 10)
    targets = torch.tensor([[1, 2, -100, -100], [-100, 3, 4, 5]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([logp[0, 0, 1] + logp[0, 1, 2], logp[1, 1, 3] + logp[1, 2, 4] + logp[1, 3, 5]])
    assert torch.allclose(sequence_logps(logits, targets), expected)


def test_dpo_loss_values():
    zero = torch.zeros(3)
    loss, stats = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert torch.isclose(loss, torch.log(torch.tensor(2.0)))  # policy = reference: -log sigmoid(0)
    assert stats["accuracy"].tolist() == [0.5, 0.5, 0.5]  # a tie ranks neither reply first: half right
    chosen, rejected = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, -1.0, -3.0])
    loss, stats = dpo_loss(chosen, rejected, zero - 2, zero - 2, beta=0.5)
    margin = 0.5 * (chosen - rejected)
    assert torch.allclose(stats["margin"], margin) and torch.allclose(loss, -F.logsigmoid(margin).mean())
    assert stats["accuracy"].tolist() == [1.0, 0.0, 0.5]


def test_dpo_on_a_toy_set_raises_the_margin_and_lowers_the_loss():
    """Prefer continuation A over B after each prompt; the reference is the same model with adapters off."""
    torch.manual_seed(0)
    model = random_model(tiny_args())
    add_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.0))
    prompts = torch.randint(0, 512, (8, 6))
    chosen = torch.cat([prompts, torch.randint(0, 512, (8, 4))], 1)
    rejected = torch.cat([prompts, torch.randint(0, 512, (8, 4))], 1)
    rows = torch.cat([chosen, rejected])
    targets = rows[:, 1:].clone()
    targets[:, :5] = -100  # only the reply is scored
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(25):
        policy = sequence_logps(model(rows[:, :-1]), targets)
        with torch.no_grad(), adapters_disabled(model):
            reference = sequence_logps(model(rows[:, :-1]), targets)
        loss, stats = dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=0.1)
        history.append((loss.item(), stats["margin"].mean().item()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    (first_loss, first_margin), (last_loss, last_margin) = history[0], history[-1]
    assert abs(first_margin) < 1e-6  # fresh adapters: the policy is the reference
    assert last_loss < first_loss - 0.3 and last_margin > 1.0


@pytest.mark.parametrize("targets", ["all", "attention"])
def test_flops_per_token_of_a_frozen_base(targets):
    """A LoRA step computes no weight gradients for the frozen base: the FLOP count (and so the MFU) must credit
    forward and input gradients only, as PyTorch's FLOP counter measures them."""
    args = tiny_args()
    model = random_model(args)
    add_lora(model, LoRAConfig(rank=4, dropout=0.0, targets=targets))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    B, T = TOKENS.shape
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.train()(TOKENS).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = 12 * args.n_layers * args.dim * T / 2  # in flops_per_token, but bmm, not mm
    expected = (flops_per_token(args, T, trained_params=trained) - attention) * B * T
    assert counts["aten.mm"] == pytest.approx(expected, rel=1e-2)
    assert counts["aten.mm"] < 6 * matmul_params(args) * B * T  # less than training every weight costs
