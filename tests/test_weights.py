"""Checkpoint formats: GGUF dequantization, exact round trips, and one clear error for each kind of bad file."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from llama3.export import save_checkpoint
from llama3.llama import build_model
from llama3.weights import WeightsError, detect_format, read_checkpoint
from llama3.weights.gguf import dequantize
from llama3.weights.hf import permute_from_hf, permute_to_hf

from conftest import random_model, tiny_args, write_gguf

@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_reference(qtype):
    kind = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, kind)
    ours = dequantize(torch.from_numpy(raw), qtype, rows=6)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw, kind)))


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_model_equals_its_dequantized_weights(tmp_path, qtype, tied):
    args = tiny_args(tie_embeddings=tied)
    model = random_model(args)
    kind = gguf.GGMLQuantizationType[qtype]
    write_gguf(tmp_path / "m.gguf", args, model.state_dict(), kind)
    ckpt = read_checkpoint(tmp_path / "m.gguf")
    assert ckpt.args.tie_embeddings == tied and ckpt.args.n_kv_heads == 2
    # The reference: the same weights dequantized by the gguf package itself.
    reference = {}
    for name, t in model.state_dict().items():
        if t.ndim == 2 and qtype != "F32":
            t = torch.from_numpy(np.asarray(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), kind), kind),
                                            np.float32))
        reference[name] = t
        if not (tied and name == "output.weight"):
            assert torch.equal(ckpt.state_dict[name].float(), t), name
    model.load_state_dict(reference)
    tokens = torch.randint(0, args.vocab_size, (1, 16))
    assert (build_model(ckpt, dtype=torch.float32)(tokens) - model(tokens)).abs().max() < 1e-5


def test_hf_permutation_round_trip():
    w = torch.randn(4 * 16, 32)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 4), 4), w)
    assert not torch.equal(permute_to_hf(w, 4), w)


def test_round_trips_are_exact(tmp_path):
    args = tiny_args(tie_embeddings=True)
    sd = {k: v.to(torch.bfloat16) for k, v in random_model(args).state_dict().items()}
    save_checkpoint(tmp_path / "hf", args, sd, layout="hf")
    save_checkpoint(tmp_path / "meta", args, read_checkpoint(tmp_path / "hf").state_dict, layout="meta", shards=2)
    save_checkpoint(tmp_path / "hf2", args, read_checkpoint(tmp_path / "meta").state_dict, layout="hf")
    back = read_checkpoint(tmp_path / "hf2")
    assert back.args == read_checkpoint(tmp_path / "hf").args
    for name, t in back.state_dict.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, sd[name]), name
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad files ----------------------------------------------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path):
    args = tiny_args()
    save_checkpoint(tmp_path / "hf", args, random_model(args).state_dict(), layout="hf")
    return tmp_path / "hf"


@pytest.fixture
def meta_dir(tmp_path):
    args = tiny_args()
    save_checkpoint(tmp_path / "meta", args, random_model(args).state_dict(), layout="meta")
    return tmp_path / "meta"


def load_model(path):
    return build_model(read_checkpoint(path), source=str(path))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        detect_format(tmp_path / "nope")


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(WeightsError, match="not a checkpoint directory"):
        read_checkpoint(tmp_path)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(WeightsError, match="not a GGUF file"):
        read_checkpoint(tmp_path / "x.gguf")


def test_truncated_gguf(tmp_path):
    args = tiny_args()
    write_gguf(tmp_path / "m.gguf", args, random_model(args).state_dict())
    truncate(tmp_path / "m.gguf", 0.6)
    with pytest.raises(WeightsError, match=r"m\.gguf.*unreadable GGUF"):
        read_checkpoint(tmp_path / "m.gguf")


def test_gguf_of_another_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(WeightsError, match="architecture 'gpt2' is not supported"):
        read_checkpoint(tmp_path / "g.gguf")


def test_truncated_safetensors(hf_dir):
    truncate(hf_dir / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*unreadable safetensors"):
        read_checkpoint(hf_dir)


def test_corrupted_safetensors_header(hf_dir):
    data = bytearray((hf_dir / "model.safetensors").read_bytes())
    data[8:20] = b"\xff" * 12
    (hf_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="unreadable safetensors"):
        read_checkpoint(hf_dir)


def test_bad_config_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON"):
        read_checkpoint(hf_dir)


def test_config_missing_key(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="missing key 'num_hidden_layers'"):
        read_checkpoint(hf_dir)


def test_config_that_does_not_match_the_weights(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"tensor layers\.0\.feed_forward\.w1\.weight has shape"):
        load_model(hf_dir)


def test_missing_tensor(meta_dir):
    sd = torch.load(meta_dir / "consolidated.00.pth")
    del sd["layers.1.ffn_norm.weight"]
    torch.save(sd, meta_dir / "consolidated.00.pth")
    with pytest.raises(WeightsError, match=r"missing \['layers\.1\.ffn_norm\.weight'\]"):
        load_model(meta_dir)


def test_truncated_pth(meta_dir):
    truncate(meta_dir / "consolidated.00.pth")
    with pytest.raises(WeightsError, match=r"consolidated\.00\.pth: unreadable PyTorch checkpoint"):
        read_checkpoint(meta_dir)


def test_pickled_code_is_never_executed(meta_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, meta_dir / "consolidated.00.pth")
    with pytest.raises(WeightsError, match="unreadable PyTorch checkpoint"):
        read_checkpoint(meta_dir)
    assert not marker.exists()


def test_shards_that_disagree(meta_dir):
    shutil.copy(meta_dir / "consolidated.00.pth", meta_dir / "consolidated.01.pth")
    sd = torch.load(meta_dir / "consolidated.01.pth")
    del sd["norm.weight"]
    torch.save(sd, meta_dir / "consolidated.01.pth")
    with pytest.raises(WeightsError, match="shard 1 holds different tensors"):
        read_checkpoint(meta_dir)
