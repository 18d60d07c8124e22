"""Hugging Face directories of every transformers version: transformers 5's `rope_parameters`, 4.x's top-level
`rope_theta` / `rope_scaling`, and the directory we export, all computing LlamaForCausalLM's logits."""

import json
import shutil

import pytest
import torch

from llama3.export import save_checkpoint
from llama3.llama import build_model
from llama3.tokenizer import Tokenizer
from llama3.weights import WeightsError, read_checkpoint

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 500000.0}


def hf_model(rope: dict, tied: bool) -> "transformers.LlamaForCausalLM":
    """A random LlamaForCausalLM in fp32 (norm weights randomized too, so a misread norm shows)."""
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=256, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters=dict(rope))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def as_4x_layout(src, dst, rope: dict):
    """The directory as transformers 4.x's save_pretrained writes it: top-level rope_theta and rope_scaling
    (None without scaling), torch_dtype, no rope_parameters."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.pop("rope_parameters")
    config.pop("dtype", None)
    config |= {"rope_theta": rope["rope_theta"], "torch_dtype": "float32", "transformers_version": "4.46.3",
               "rope_scaling": None if rope["rope_type"] == "default" else
               {k: v for k, v in rope.items() if k != "rope_theta"}}
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def hf_logits(path, tokens):
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)(tokens).logits


@pytest.mark.parametrize("rope", [DEFAULT_ROPE, LLAMA3_ROPE], ids=["default", "llama3"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_every_transformers_layout_gives_llama_for_causal_lm_logits(tmp_path, rope, tied):
    model = hf_model(rope, tied)
    model.save_pretrained(tmp_path / "v5")
    as_4x_layout(tmp_path / "v5", tmp_path / "v4", rope)
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens).logits
    for layout in ("v5", "v4"):
        ckpt = read_checkpoint(tmp_path / layout)
        assert ckpt.args.rope_theta == 500000.0 and (ckpt.args.rope_scaling is None) == (rope is DEFAULT_ROPE)
        ours = build_model(ckpt, dtype=torch.float32)(tokens)
        assert (ours - reference).abs().max() < 1e-4, layout

    # Our export: transformers 5 reads it as the same model, and so does a reader that sees only the 4.x keys.
    save_checkpoint(tmp_path / "ours", ckpt.args, ckpt.state_dict, layout="hf")
    assert (hf_logits(tmp_path / "ours", tokens) - reference).abs().max() < 1e-4
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    config.pop("rope_parameters")
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    assert (hf_logits(tmp_path / "ours", tokens) - reference).abs().max() < 1e-4


def test_export_names_the_chat_stop_tokens_for_hf_generate(tmp_path):
    """HF's generate stops at generation_config's eos_token_id: it must hold <|eot_id|> (and <|eom_id|>), not only
    <|end_of_text|>, or an instruct model runs on into the next turn."""
    from conftest import random_model, tiny_args
    args = tiny_args()
    save_checkpoint(tmp_path / "hf", args, random_model(args).state_dict(), layout="hf", tokenizer=Tokenizer())
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert generation.bos_token_id == config.bos_token_id == 128000
    assert generation.eos_token_id == config.eos_token_id == [128001, 128008, 128009]


def write_config(path, **changes):
    from conftest import random_model, tiny_args
    args = tiny_args()
    save_checkpoint(path, args, random_model(args).state_dict(), layout="hf")
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_scaling": None,
      "rope_theta": None},
     "rope_type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "rope_type 'linear'"),
    ({"rope_parameters": {**LLAMA3_ROPE, "partial_rotary_factor": 0.5}, "rope_scaling": None,
      "rope_theta": None},
     "partial_rotary_factor not understood"),
    ({"rope_parameters": {**DEFAULT_ROPE, "rope_theta": 10000.0}}, "disagrees"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config not understood"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rope_interleaved": True}, "rope_interleaved=True"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "rope_scaling": None,
      "rope_theta": None},
     "needs 'low_freq_factor'"),
])
def test_configs_we_cannot_compute_exactly_are_errors(tmp_path, changes, message):
    with pytest.raises(WeightsError, match=message):
        read_checkpoint(write_config(tmp_path / "hf", **changes))
