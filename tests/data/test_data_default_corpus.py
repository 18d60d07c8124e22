import argparse
import os
import time

from data_testkit import TOKENIZER
from llama3.data import TokenLoader, TokenShards, default_corpus_dir, prepare_default_corpus
from llama3.data.default_corpus import stdlib_documents
from llama3.data.cli import add_data_parser, cli_data


def test_stdlib_documents_are_module_docstrings(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module doc."""\n\nclass Thing:\n    """Thing doc."""\n\n    def go(self):\n        """Go doc."""\n'
    )
    (tmp_path / "nodoc.py").write_text("x = 1\n")
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text('"""Tests are not documentation."""\n')
    docs = list(stdlib_documents(tmp_path))
    assert docs == [
        "# pkg\n\npkg\n\nThe package.\n",
        "# pkg.mod\n\npkg.mod\n\nModule doc.\n\nThing\n\nThing doc.\n\ngo\n\nGo doc.\n",
    ]


def test_default_corpus_directory_names(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA3_HOME", str(tmp_path))
    assert default_corpus_dir().name.endswith("-llama3") and default_corpus_dir().parent == tmp_path / "data"
    assert default_corpus_dir("/a/tokenizer.model") != default_corpus_dir("/b/tokenizer.model")
    monkeypatch.delenv("LLAMA3_HOME")
    assert str(default_corpus_dir()).startswith(os.path.expanduser("~/.cache/llama3/data/"))


def test_default_corpus_builds_once_under_llama3_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAMA3_HOME", str(tmp_path / "home"))
    out = default_corpus_dir()
    assert prepare_default_corpus(workers=2) == out
    index_time = os.stat(out / "index.json").st_mtime_ns
    time.sleep(0.01)
    assert prepare_default_corpus() == out  # already there: nothing is rebuilt
    assert os.stat(out / "index.json").st_mtime_ns == index_time

    shards = TokenShards(out)
    assert shards.num_documents > 100 and shards.num_tokens > 100_000
    texts = {TOKENIZER.decode(shards.document(i)[1:-1].tolist()).split("\n", 1)[0] for i in range(shards.num_documents)}
    assert "# json" in texts and "# argparse" in texts
    inputs, targets = next(TokenLoader(out, batch_size=2, seq_len=256))
    assert inputs.shape == (2, 256)

    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers())
    cli_data(parser.parse_args(["data", "default-corpus", "--out", str(out)]))  # built: only prints where
    assert capsys.readouterr().out.strip() == str(out)
