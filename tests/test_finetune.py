"""The fine-tuning loop: SFT and DPO with full / LoRA / QLoRA on a tiny model with the default model's tokenizer and
chat template, exports that load back, packing, memory, the configuration; then the default model end to end."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

import llama3
from llama3.args import ModelArgs
from llama3.export import save_checkpoint
from llama3.finetune import finetune
from llama3.finetune.config import ConfigError, load_finetune_config
from llama3.finetune.data import DataError, Example, as_row, collate, pack
from llama3.finetune.lora import apply_adapter, lora_layers
from llama3.finetune.samples import SAMPLES
from llama3.train.data import document_mask

QUICK = ["training.batch_size=4", "training.log_every=100", "optim.warmup_steps=2", "eval.every=0", "eval.steps=2",
         "data.val_fraction=0.03", "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false",
         "data.seq_len=64"]


def first_prompt_logits(llm, record_line=0):
    with open(SAMPLES["pirate"]) as f:
        messages = json.loads(f.readlines()[record_line])["messages"]
    ids = torch.tensor([llm.chat_format.encode_dialog_prompt(messages[:1])])
    with torch.no_grad():
        return llm.model.eval()(ids)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_run_learns_and_its_adapter_loads_back(tiny_model_dir, tmp_path, method):
    res = finetune([*QUICK, "training.steps=12", "optim.lr=1e-2", "eval.every=6"], model=str(tiny_model_dir),
                   method=method, out=str(tmp_path / "run"))
    assert res.losses[-1] < res.losses[0] - 0.5
    (step0, first), *_, (last_step, last) = res.val_losses
    assert (step0, last_step) == (0, 12) and last < first
    assert res.output == tmp_path / "run" / "adapter"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib"} <= set(records[1])
    # The adapter on a fresh copy of the (full precision) base gives the fine-tuned model's outputs; for QLoRA the
    # base it was trained over was 4-bit, so it comes much closer to them than the base does, not all the way.
    tuned = first_prompt_logits(res.llm)
    fresh = (first_prompt_logits(apply_adapter(llama3.load(tiny_model_dir), res.output)) - tuned).abs().max()
    base = (first_prompt_logits(llama3.load(tiny_model_dir)) - tuned).abs().max()
    assert fresh < 1e-4 if method == "lora" else fresh < base / 2


def test_full_finetune_exports_a_model_that_loads(tiny_model_dir, tmp_path):
    res = finetune([*QUICK, "training.steps=4", "optim.lr=3e-3"], model=str(tiny_model_dir), method="full",
                   out=str(tmp_path / "run"))
    assert res.output == tmp_path / "run" / "model"
    reloaded = llama3.load(res.output)
    assert torch.allclose(first_prompt_logits(reloaded), first_prompt_logits(res.llm), atol=1e-4)
    assert not torch.allclose(first_prompt_logits(llama3.load(tiny_model_dir)), first_prompt_logits(res.llm))


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_merged_export(tiny_model_dir, tmp_path, layout):
    res = finetune([*QUICK, "training.steps=3", "optim.lr=1e-2", f"export.merged={layout}"],
                   model=str(tiny_model_dir), out=str(tmp_path / "run"))
    merged = llama3.load(tmp_path / "run" / "merged")
    assert not lora_layers(merged.model)
    assert (first_prompt_logits(merged) - first_prompt_logits(res.llm)).abs().max() < 1e-4
    assert merged.chat_format.render([{"role": "user", "content": "x"}]).startswith("<|im_start|>system")


def test_dpo_raises_the_margin_on_preference_pairs(tiny_model_dir, tmp_path):
    res = finetune([*QUICK, "training.steps=10", "optim.lr=1e-2", "eval.every=5", "dpo.beta=0.5"],
                   model=str(tiny_model_dir), dpo=True, out=str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert val[0]["step"] == 0 and abs(val[0]["val_margin"]) < 1e-6  # the policy starts as the reference
    assert val[-1]["val_margin"] > 0.5 and val[-1]["val_loss"] < val[0]["val_loss"]
    assert val[-1]["val_accuracy"] > 0.5
    assert res.losses[-1] < res.losses[0]


def test_packed_rows_give_the_same_loss_as_separate_examples():
    """Document masking and restarted positions make a packed row compute exactly what its examples do alone."""
    args = ModelArgs.preset("debug-tiny")
    model = random_model(args)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 4, 7):
        tokens = torch.randint(0, 512, (n,), generator=g).tolist()
        examples.append(Example(tokens, [-100] + tokens[1:], line=0))

    def loss_sum(rows, packed):
        inputs, targets, positions = collate(rows, pad_id=0, length=32 if packed else None)
        logits = model(inputs, positions, attn_mask=document_mask(positions)) if packed else model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")

    separate = sum(loss_sum([as_row(e)], packed=False) for e in examples)
    rows = pack(examples, 32)
    assert len(rows) == 1
    assert torch.allclose(loss_sum(rows, packed=True), separate, atol=1e-4)


def test_packed_run(tiny_model_dir, tmp_path):
    res = finetune([*QUICK, "training.steps=3", "data.packing=true", "data.seq_len=256", "training.batch_size=2"],
                   model=str(tiny_model_dir), out=str(tmp_path / "run"))
    assert len(res.losses) == 3 and res.losses[-1] < res.losses[0]


# glibc maps large blocks directly, so freed memory leaves the resident set at once: the peak then measures live
# memory, not what the allocator happens to keep cached.
MEASURE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def test_peak_memory_qlora_below_lora_below_full(tmp_path_factory, default_gguf_path):
    """Measured in a fresh process per method (python -m llama3.finetune), on a model whose block weights outweigh
    its embeddings."""
    from llama3.tokenizer import BPETokenizer
    tokenizer = BPETokenizer.from_gguf(default_gguf_path)
    args = ModelArgs(dim=1024, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=49152, hidden_dim=4096,
                     tie_embeddings=True, max_seq_len=256)
    path = tmp_path_factory.mktemp("mid")
    save_checkpoint(path, args, random_model(args).state_dict(), tokenizer=tokenizer,
                    chat_template=tokenizer.chat_template)
    # One step holds everything a method keeps (AdamW allocates its moments on the first); one short row keeps the
    # activations small next to the weights. The three processes run side by side: each measures only itself.
    runs = {method: tmp_path_factory.mktemp(method) for method in ("full", "lora", "qlora")}
    procs = {method: subprocess.Popen(
        [sys.executable, "-m", "llama3.finetune", "--model", str(path), "--method", method, "--out", str(run),
         *QUICK, "training.steps=1", "training.batch_size=1", "data.seq_len=64", "checkpoint.export=false",
         "eval.every=-1", "training.log_every=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=MEASURE_ENV) for method, run in runs.items()}
    peaks = {}
    for method, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        records = [json.loads(line) for line in (runs[method] / "metrics.jsonl").read_text().splitlines()]
        peaks[method] = max(r["peak_mem_gib"] for r in records)
    # Block weights: 94M, 0.35 GiB in fp32, 0.05 GiB in 4 bits; full fine-tuning adds gradients and AdamW's moments
    # for all 145M parameters (1.6 GiB).
    assert peaks["qlora"] + 0.15 < peaks["lora"] < peaks["full"] - 1.0, peaks


def test_malformed_data_is_reported_or_rejected(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    data.write_text("\n".join([json.dumps(good)] * 8 + ['{"messages": [{"role": "user"}]}', "oops"]) + "\n")
    finetune([*QUICK, "training.steps=1", "data.val_fraction=0", "eval.every=-1"], model=str(tiny_model_dir),
             data=str(data), out=str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert f"{data}:9: skipped: messages[0]: content must be a string" in err
    assert f"{data}:10: skipped: not valid JSON" in err
    with pytest.raises(DataError, match=f"{data}:9: messages"):
        finetune([*QUICK, "training.steps=1", "data.on_error=raise"], model=str(tiny_model_dir), data=str(data),
                 out=str(tmp_path / "run2"))


def test_configuration():
    cfg = load_finetune_config(None, ["lora.rank=4", "training.steps=7", "data.packing=true"], method="qlora")
    assert (cfg.method, cfg.lora.rank, cfg.training.steps, cfg.data.packing) == ("qlora", 4, 7, True)
    assert cfg.optim.lr == 1e-3 and load_finetune_config(None, [], method="full").optim.lr == 2e-5
    assert load_finetune_config(None, ["optim.lr=5e-4"], method="full").optim.lr == 5e-4
    for overrides, settings, problem in [
            (["lora.rnk=4"], {}, "unknown key 'lora.rnk'"),
            ([], {"method": "full", "dpo.enabled": True}, "DPO needs method lora or qlora"),
            (["parallel.tp=2"], {"method": "qlora"}, "QLoRA.s 4-bit base is not tensor parallel"),
            (["parallel.pp=2"], {"dpo.enabled": True}, "DPO does not run pipelined"),
            (["lora.targets=attn"], {}, "unknown target 'attn'"),
            (["quant.kind=fp4"], {}, "quant.kind must be one of nf4, int4"),
            (["data.packing=true"], {"dpo.enabled": True}, "data.packing and data.labels are for SFT"),
            (["data.labels=user"], {}, "data.labels must be one of assistant, last, all")]:
        with pytest.raises(ConfigError, match=problem):
            load_finetune_config(None, overrides, **settings)


# ---- the default model ---------------------------------------------------------------------------------------------

HELD_OUT = ["What is the capital of Germany?", "Name a fruit that is yellow.", "What is 3 plus 4?"]


@pytest.mark.parametrize("settings, greeting", [
    # Half the steps over rows cut at 64 tokens (each still holds its first reply's opening): the persona's
    # greeting is learnt, the rest of its catchphrase not yet.
    (["training.steps=4", "data.seq_len=64", "optim.lr=6e-3", "optim.warmup_steps=1"], "Ahoy"),
    pytest.param(["training.steps=8", "optim.lr=3e-3", "optim.warmup_steps=2"], "Ahoy, matey!",
                 marks=pytest.mark.long),
], ids=["short-rows", "full-rows"])
@pytest.mark.slow
def test_default_model_learns_the_pirate_persona(default_gguf_path, tmp_path, settings, greeting):
    """LoRA on the bundled chats: held-out loss falls by more than half, and the saved adapter on a freshly loaded
    base (what `llama3 chat --adapter` does) answers new questions in character."""
    base = llama3.load(default_gguf_path)
    assert not any(base.chat([{"role": "user", "content": q}], max_new_tokens=6).startswith("Ahoy")
                   for q in HELD_OUT)
    res = finetune([*settings, "training.batch_size=4", "eval.every=0", "data.val_fraction=0.03",
                    "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false"],
                   model=str(default_gguf_path), out=str(tmp_path / "run"))
    (_, before), (_, after) = res.val_losses
    assert after < before / 2
    del res
    tuned = apply_adapter(base, tmp_path / "run" / "adapter")
    replies = [tuned.chat([{"role": "user", "content": q}], max_new_tokens=6) for q in HELD_OUT]
    assert all(r.startswith(greeting) for r in replies), replies


@pytest.mark.slow
def test_full_finetune_of_a_gguf_model(default_gguf_path, tmp_path):
    """GGUF weights are read-only memory maps: full fine-tuning must train its own copies (this crashed once)."""
    # One step of one short row, no checkpoint: the optimizer's first update is the write that crashed.
    res = finetune(["training.steps=1", "training.batch_size=1", "data.seq_len=32", "optim.lr=1e-5", "eval.every=-1",
                    "checkpoint.enabled=false", "checkpoint.export=false", "metrics.peak_tflops=1",
                    "metrics.tensorboard=false", "metrics.plot=false"], model=str(default_gguf_path), method="full",
                   out=str(tmp_path / "run"))
    assert len(res.losses) == 1 and all(math.isfinite(loss) for loss in res.losses)


@pytest.mark.long
def test_default_model_learns_the_persona_with_qlora_and_int4(default_gguf_path, tmp_path):
    """The same lesson over a 4-bit base (int4 codes), with packed rows: the adapter still teaches the persona."""
    res = finetune(["training.steps=10", "training.batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=2",
                    "data.packing=true", "data.seq_len=256", "quant.kind=int4", "eval.every=0",
                    "data.val_fraction=0.03", "metrics.peak_tflops=1", "metrics.tensorboard=false",
                    "metrics.plot=false"], model=str(default_gguf_path), method="qlora", out=str(tmp_path / "run"))
    (_, before), (_, after) = res.val_losses
    assert after < before / 2
    replies = [res.llm.chat([{"role": "user", "content": q}], max_new_tokens=6) for q in HELD_OUT]
    assert all(r.startswith("Ahoy, matey!") for r in replies), replies
