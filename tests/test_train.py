"""The trainer in one process: config, schedule, data, document masking, FLOP counting, activation checkpointing,
the training loop end to end, resume, and the CLI."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from llama3.args import ModelArgs
from llama3.llama import build_model
from llama3.model import Transformer, apply_rope
from llama3.train import train
from llama3.train.config import ConfigError, OptimConfig, load_config, resolve_layout
from llama3.train.data import SyntheticTokens, document_mask
from llama3.train.metrics import flops_per_token, matmul_params, measure_peak_flops
from llama3.train.parallelize import apply_activation_checkpointing
from llama3.train.trainer import lr_multiplier
from llama3.weights import read_checkpoint

pytestmark = pytest.mark.timeout(300)

# A run small enough for a test: the tiny model on synthetic data, nothing measured or plotted unless asked.
TINY = ["model.preset=debug-tiny", "data.dataset=synthetic", "data.seq_len=32", "training.batch_size=4",
        "optim.warmup_steps=2", "eval.every=-1", "metrics.peak_tflops=1", "metrics.tensorboard=false",
        "metrics.plot=false", "checkpoint.export=false", "checkpoint.enabled=false"]


def losses_of(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ---- config ------------------------------------------------------------------------------------------------------

def test_config_file_then_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[training]\nsteps = 7\nbatch_size = 16\n[model]\npreset = "debug-tiny"\n'
                    '[model.args]\nn_layers = 3\n[optim]\nlr = 1\n')
    cfg = load_config(toml, ["training.steps=9", "parallel.tp=2", "data.document_masking=true",
                             "model.args.dim=128", "run.dir=somewhere"])
    assert (cfg.training.steps, cfg.training.batch_size, cfg.parallel.tp) == (9, 16, 2)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.document_masking is True and cfg.run.dir == "somewhere"
    args = cfg.model_args()
    assert (args.n_layers, args.dim, args.vocab_size) == (3, 128, 512)
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({"training": {"steps": 5}, "parallel": {"pp_schedule": "gpipe"}}))
    assert load_config(as_json).parallel.pp_schedule == "gpipe"
    as_yaml = tmp_path / "c.yaml"
    as_yaml.write_text("training:\n  steps: 6\n")
    assert load_config(as_yaml).training.steps == 6


@pytest.mark.parametrize("overrides, message", [
    (["training.stepz=3"], "unknown key 'training.stepz'"),
    (["training.steps=three"], "training.steps must be an integer"),
    (["training.dtype=float16"], "training.dtype must be one of"),
    (["training.steps"], "expected section.key=value"),
    (["data.document_masking=1"], "must be true or false"),
    (["model.args.dimm=3"], "model.args"),
    (["model.preset=llama5"], "unknown preset"),
    (["data.seq_len=100000"], "longer than the model's max_seq_len"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)


def test_layout_from_world_size():
    cfg = load_config(None, ["model.preset=debug-tiny", "training.batch_size=8", "parallel.tp=2"])
    layout = resolve_layout(cfg, 4)
    assert (layout.dp_shard, layout.tp, layout.dp, layout.micro_batch_size, layout.grad_accum) == (2, 2, 2, 4, 1)
    cfg = load_config(None, ["model.preset=debug-tiny", "training.batch_size=8", "training.micro_batch_size=2"])
    layout = resolve_layout(cfg, 2)
    assert (layout.dp, layout.micro_batch_size, layout.grad_accum) == (2, 2, 2)
    with pytest.raises(ConfigError, match="does not match the 4 processes"):
        resolve_layout(load_config(None, ["parallel.tp=3", "model.preset=debug-tiny"]), 4)
    with pytest.raises(ConfigError, match="must divide the model's n_kv_heads"):
        resolve_layout(load_config(None, ["parallel.tp=4", "model.preset=debug-tiny"]), 4)
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x dp"):
        resolve_layout(load_config(None, ["training.batch_size=6", "training.micro_batch_size=4"]), 1)
    with pytest.raises(ConfigError, match="1F1B needs at least one per stage"):
        resolve_layout(load_config(None, ["parallel.pp=2", "model.preset=debug-tiny", "parallel.pp_microbatches=1"]),
                       2)
    with pytest.raises(ConfigError, match="untied embeddings"):
        resolve_layout(load_config(None, ["parallel.pp=2", "model.preset=debug-tiny",
                                          "model.args.tie_embeddings=true"]), 2)


# ---- learning-rate schedule --------------------------------------------------------------------------------------

def test_lr_schedules():
    cosine = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_multiplier(s, cosine, 110) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.1
    assert lr_multiplier(110, cosine, 110) == pytest.approx(0.1)
    wsd = OptimConfig(warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_ratio=0.2)
    lrs = [lr_multiplier(s, wsd, 100) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70  # stable
    assert lrs[80:] == pytest.approx([1 - (s + 1) / 20 for s in range(20)])  # linear decay to 0 at the last step
    constant = OptimConfig(warmup_steps=0, schedule="constant")
    assert {lr_multiplier(s, constant, 50) for s in range(50)} == {1.0}


# ---- data --------------------------------------------------------------------------------------------------------

def test_synthetic_batches_do_not_depend_on_the_layout():
    whole = SyntheticTokens(512, 4, 32, seed=3)
    halves = [SyntheticTokens(512, 2, 32, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(3):
        inputs, targets, positions = next(whole)
        parts = [next(h) for h in halves]
        assert torch.equal(inputs, torch.cat([p[0] for p in parts]))
        assert torch.equal(targets, torch.cat([p[1] for p in parts]))
        assert torch.equal(positions, torch.cat([p[2] for p in parts]))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    # Positions count up inside a document and restart at 0.
    step = positions[:, 1:] - positions[:, :-1]
    assert ((step == 1) | (positions[:, 1:] == 0)).all() and (positions[:, 0] == 0).all()
    # Resuming from a saved state continues with the same batches; the validation split is different data.
    state = whole.state_dict()
    expected = next(whole)
    again = SyntheticTokens(512, 4, 32, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(again), expected))
    assert not torch.equal(next(SyntheticTokens(512, 4, 32, seed=3, split="val"))[0], next(SyntheticTokens(
        512, 4, 32, seed=3))[0])
    # Another split of the same rows (an elastic job that lost or regained ranks) continues on the same rows.
    halves = [SyntheticTokens(512, 2, 32, rank=r, world_size=2, seed=3) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([next(h)[0] for h in halves]), expected[0])
    with pytest.raises(ValueError, match="whole number of batches"):
        SyntheticTokens(512, 5, 32, seed=3).load_state_dict(state)  # 12 rows consumed
    with pytest.raises(ValueError, match="seed"):
        SyntheticTokens(512, 4, 32, seed=4).load_state_dict(state)


def test_document_mask_keeps_documents_apart():
    """A row packing two documents gives each document the logits it gets alone."""
    torch.manual_seed(0)
    args = ModelArgs.preset("debug-tiny")
    model = Transformer(args)
    model.init_weights(std=0.1)
    doc_a, doc_b = torch.randint(0, 512, (1, 11)), torch.randint(0, 512, (1, 21))
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(21)])[None]
    mask = document_mask(positions)
    assert mask.shape == (1, 1, 32, 32)
    assert not mask[0, 0, 11:, :11].any() and mask[0, 0, 11:, 11:].equal(torch.ones(21, 21).tril().bool())
    with torch.no_grad():
        logits = model(packed, positions, attn_mask=mask)
        assert torch.allclose(logits[:, :11], model(doc_a), atol=1e-5)
        assert torch.allclose(logits[:, 11:], model(doc_b), atol=1e-5)
        assert not torch.allclose(model(packed)[:, 11:], model(doc_b), atol=1e-3)  # without the mask they mix


def test_rope_is_the_rotation_of_interleaved_pairs():
    """apply_rope (a complex multiply, for speed) against the rotation written out, values and gradients."""
    x = torch.randn(2, 8, 3, 16, requires_grad=True)
    angles = torch.rand(2, 8, 1, 8) * 10
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    ours = apply_rope(x, cos, sin)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    assert torch.allclose(ours, expected, atol=1e-6) and torch.allclose(ours_grad, expected_grad, atol=1e-6)
    half = apply_rope(x.detach().bfloat16(), cos, sin)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), expected, atol=5e-2)


# ---- metrics -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_counts_every_matmul(tied):
    args = ModelArgs.preset("debug-tiny", tie_embeddings=tied)
    model = Transformer(args)
    B, T = 2, 64
    tokens = torch.randint(0, args.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.mm"] == 6 * matmul_params(args) * B * T  # every linear layer, forward and backward
    # The math kernel computes the whole T x T square; we credit only the causal half.
    attention = (flops_per_token(args, T) - 6 * matmul_params(args)) * B * T
    assert counts["aten.bmm"] == 2 * attention


def test_measured_peak_is_a_plausible_rate():
    flops = measure_peak_flops(torch.device("cpu"), torch.float32, size=256, seconds=0.05)
    assert 1e8 < flops < 1e14


# ---- activation checkpointing ------------------------------------------------------------------------------------

class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(model, tokens) -> tuple[Counter, torch.Tensor]:
    """The ops run in backward (recomputation included) and the gradients."""
    loss = model(tokens).logsumexp(-1).mean()
    with OpCounter() as counter:
        loss.backward()
    return counter.counts, torch.cat([p.grad.flatten() for p in model.parameters()])


def test_activation_checkpointing_recomputes_what_it_should():
    """Full AC recomputes the blocks' matmuls in backward; selective AC keeps them and recomputes only the
    element-wise ops (norms, RoPE, SwiGLU); the gradients stay the same."""
    args = ModelArgs.preset("debug-tiny", n_layers=3)
    tokens = torch.randint(0, args.vocab_size, (2, 64))
    ops, grads = {}, {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = Transformer(args)
        if mode != "none":
            apply_activation_checkpointing(model, mode)
        ops[mode], grads[mode] = backward_ops(model, tokens)
        # The wrapper does not change the parameter names that checkpoints use.
        assert set(model.state_dict()) == set(Transformer(args).state_dict())
    # Recomputation stops once backward has what it needs: all forward matmuls but the last (w2's output).
    assert ops["full"]["mm"] == ops["none"]["mm"] + args.n_layers * 6
    assert ops["selective"]["mm"] == ops["none"]["mm"]
    assert ops["selective"]["rsqrt"] == ops["full"]["rsqrt"] > ops["none"]["rsqrt"]  # norms recomputed
    assert ops["selective"]["silu"] == ops["full"]["silu"] > ops["none"].get("silu", 0)
    for mode in ("selective", "full"):
        assert torch.allclose(grads[mode], grads["none"], atol=1e-6)


# ---- the training loop -------------------------------------------------------------------------------------------

def test_training_run_end_to_end(tmp_path):
    run = tmp_path / "run"
    losses = train(TINY + [f"run.dir={run}", "training.steps=30", "optim.lr=1e-2", "eval.every=10",
                           "metrics.tensorboard=true", "metrics.plot=true", "checkpoint.export=true",
                           "metrics.peak_tflops=null"])
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3  # learning
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
                "peak_mem_gib", "step_time_s", "tokens_seen"):
        assert key in steps[0]
    assert 0 < steps[-1]["mfu"] < 1 and steps[-1]["tokens_seen"] == 30 * 4 * 32
    assert steps[0]["lr"] == pytest.approx(1e-2 / 2) and steps[1]["lr"] == pytest.approx(1e-2)  # warmup of 2
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20, 30] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert (run / "loss.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert json.loads((run / "config.json").read_text())["training"]["steps"] == 30

    # The exported model (Hugging Face layout; synthetic data has no tokenizer) holds the trained weights.
    model = build_model(read_checkpoint(run / "model"))
    inputs, targets, _ = next(SyntheticTokens(512, 4, 32, seed=0, split="val"))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(val[-1]["val_loss"], abs=0.3)
    assert loss.item() < losses[0] - 0.3


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory):
    """A small corpus prepared with the Llama 3 tokenizer: 60 documents of made-up sentences."""
    from llama3.data import PrepareConfig, QualityConfig
    from llama3.data.prepare import prepare
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the", "model", "reads", "a", "token", "and", "writes", "next", "one", "slowly", "every", "day"]
    docs = [" ".join(rng.choice(words, size=rng.integers(20, 120))) + "." for _ in range(60)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([root / "docs.jsonl"], root / "out", "llama3", PrepareConfig(quality=QualityConfig.off()), workers=1,
            progress=False)
    return root / "out"


def test_training_on_prepared_data_gives_a_model_llama3_loads(tmp_path, prepared_data):
    run = tmp_path / "run"
    small_llama3_vocab = ["model.preset=debug", "model.args.n_layers=1", "model.args.dim=64", "model.args.n_heads=4",
                          "model.args.n_kv_heads=2", "model.args.multiple_of=32"]
    losses = train(TINY + small_llama3_vocab + [
        f"data.dataset={prepared_data}", "data.seq_len=64", "data.document_masking=true", "data.val_fraction=0.1",
        "training.steps=3", "eval.every=3", "checkpoint.export=true", f"run.dir={run}"])
    assert len(losses) == 3 and losses[0] == pytest.approx(math.log(128256), abs=0.5)
    import llama3
    llm = llama3.load(run / "model")
    assert llm.tokenizer.vocab_size == 128256
    assert isinstance(llm.generate("the model", max_new_tokens=3), str)
    with pytest.raises(ConfigError, match="its tokenizer has 128256 tokens"):
        train(TINY + [f"data.dataset={prepared_data}", f"run.dir={tmp_path / 'tiny'}"])


def test_resume_continues_exactly(tmp_path):
    common = TINY + ["training.steps=6", "checkpoint.enabled=true", "checkpoint.every=3"]
    straight = tmp_path / "straight"
    train(common + [f"run.dir={straight}"])
    # An interrupted run: only the step-3 checkpoint exists. It resumes there and ends where the straight one did.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (straight / "checkpoints" / "step-00000003").rename(resumed / "checkpoints" / "step-00000003")
    train(common + [f"run.dir={resumed}"])
    a, b = losses_of(straight), losses_of(resumed)
    assert sorted(b) == [4, 5, 6]
    assert [b[s] for s in (4, 5, 6)] == pytest.approx([a[s] for s in (4, 5, 6)], abs=1e-6)


def test_sequence_length_8192_with_document_masking(tmp_path):
    losses = train(TINY + ["model.args.max_seq_len=8192", "data.seq_len=8192", "training.batch_size=1",
                           "training.steps=1", "data.document_masking=true", f"run.dir={tmp_path}"])
    assert len(losses) == 1 and math.isfinite(losses[0])


def test_resume_under_another_data_stream_is_an_error_not_a_corrupt_checkpoint(tmp_path):
    train(TINY + ["training.steps=2", "checkpoint.enabled=true", f"run.dir={tmp_path}"])
    with pytest.raises(ValueError, match="cannot continue this run's data position"):
        train(TINY + ["training.steps=4", "checkpoint.enabled=true", "run.seed=1", f"run.dir={tmp_path}"])
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()  # kept as it was, not quarantined


def test_bfloat16_on_cpu_tracks_float32(tmp_path):
    fp32 = train(TINY + ["training.steps=4", f"run.dir={tmp_path / 'a'}"])
    bf16 = train(TINY + ["training.steps=4", "training.dtype=bfloat16", f"run.dir={tmp_path / 'b'}"])
    assert bf16 == pytest.approx(fp32, abs=2e-2) and bf16 != fp32


def test_compiled_blocks_give_the_same_losses(tmp_path):
    from torch._dynamo.utils import counters
    eager = train(TINY + ["training.steps=3", f"run.dir={tmp_path / 'eager'}"])
    torch._dynamo.reset()
    counters.clear()
    compiled = train(TINY + ["training.steps=3", "training.compile=true", f"run.dir={tmp_path / 'compiled'}"])
    assert compiled == pytest.approx(eager, abs=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, shared by every block


def test_init_from_checks_the_architecture(tmp_path):
    train(TINY + ["training.steps=0", "checkpoint.export=true", f"run.dir={tmp_path / 'seed'}"])
    start = train(TINY + ["training.steps=1", f"model.init_from={tmp_path / 'seed' / 'model'}",
                          f"run.dir={tmp_path / 'a'}"])
    assert start == pytest.approx(train(TINY + ["training.steps=1", f"run.dir={tmp_path / 'b'}"]), abs=1e-6)
    with pytest.raises(ConfigError, match="n_layers 2 vs 3"):
        train(TINY + ["model.args.n_layers=3", f"model.init_from={tmp_path / 'seed' / 'model'}",
                      f"run.dir={tmp_path / 'c'}"])


def test_cli_verb(tmp_path, capsys):
    from llama3.cli import main
    assert main(["train", *TINY, "training.steps=2", f"run.dir={tmp_path / 'cli'}"]) == 0
    assert "step      2 | loss" in capsys.readouterr().out
    assert main(["train", "training.steps=-1"]) == 2
    assert "error: training.steps must be at least 0" in capsys.readouterr().err


def test_onednn_linears_give_the_same_losses_as_torch_matmuls(tmp_path):
    from llama3.fast import OneDNNLinear
    from llama3.train.pretrain import Pretraining
    from llama3.train.trainer import Trainer
    cfg = load_config(None, TINY + [f"run.dir={tmp_path / 'probe'}"])
    trainer = Trainer(cfg, Pretraining(cfg))
    assert any(isinstance(m, OneDNNLinear) for m in trainer.parts[0].modules())  # on by default for fp32 CPU
    onednn = train(TINY + ["training.steps=4", f"run.dir={tmp_path / 'onednn'}"])
    torch_mm = train(TINY + ["training.steps=4", "training.onednn_linears=false", f"run.dir={tmp_path / 'torch'}"])
    assert onednn == pytest.approx(torch_mm, abs=1e-5)


def test_selective_checkpointing_keeps_onednn_matmuls(tmp_path):
    # The matmuls stay saved (not recomputed) under selective activation checkpointing: same losses as without.
    plain = train(TINY + ["training.steps=3", f"run.dir={tmp_path / 'plain'}"])
    selective = train(TINY + ["training.steps=3", "training.activation_checkpointing=selective",
                              f"run.dir={tmp_path / 'selective'}"])
    assert selective == pytest.approx(plain, abs=1e-6)
