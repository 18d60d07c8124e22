import argparse
import re
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

import llama3.data.prepare as prepare_module
import llama3.data.shards as shards_module
from llama3.data import DataError, InputOptions, MinHashConfig, PrepareConfig, QualityConfig, TokenShards
from llama3.data.cli import add_data_parser, cli_data
from llama3.data.prepare import prepare
from data_testkit import TOKENIZER, make_document

NO_FILTERS = PrepareConfig(quality=QualityConfig.off())


def decoded_documents(out_dir) -> list[str]:
    """Every document of a prepared directory, checked for its bos/eos frame and decoded."""
    shards = TokenShards(out_dir)
    texts = []
    for i in range(shards.num_documents):
        tokens = shards.document(i).tolist()
        assert tokens[0] == TOKENIZER.bos_id and tokens[-1] == TOKENIZER.eos_id
        texts.append(TOKENIZER.decode(tokens[1:-1]))
    return texts


def directory_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, texts, field="text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_text_jsonl_parquet_and_gzip_inputs_decode_back_exactly(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tricky = [
        "Windows line ends\r\nstay as they are.\r\n",
        "Ünïcödé, emoji 🦙 and CJK 日本語 survive.",
        "Text that looks special: <|end_of_text|> and <|begin_of_text|> is plain text here.",
        "  leading and trailing whitespace is kept  \n\n",
    ]
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text(tricky[0], encoding="utf-8", newline="")
    (src / "nested" / "b.md").write_text(tricky[1], encoding="utf-8")
    write_jsonl(src / "nested" / "c.jsonl", [tricky[2]], field="content")
    pq.write_table(pa.table({"body": [tricky[3]]}), src / "nested" / "deeper" / "d.parquet")
    with gzip.open(src / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": "Compressed JSONL works too."}) + "\n")
    (src / "ignored.bin").write_bytes(b"\x00\x01")  # unknown kinds inside a directory are skipped
    (src / ".hidden.txt").write_text("hidden files are skipped")

    options = InputOptions(jsonl_field="content", parquet_column="body")
    stats = prepare([src], tmp_path / "out", TOKENIZER, PrepareConfig(inputs=options, quality=QualityConfig.off()), workers=1, progress=False)

    # Directory order is sorted by path: a.txt, e.jsonl.gz, nested/b.md, nested/c.jsonl, nested/deeper/d.parquet
    expected = [tricky[0], "Compressed JSONL works too.", tricky[1], tricky[2], tricky[3]]
    assert decoded_documents(tmp_path / "out") == expected
    assert stats.files == 5 and stats.documents_kept == 5
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["total_tokens"] == stats.tokens == sum(len(TOKENIZER.encode(t, bos=True, eos=True)) for t in expected)
    assert index["dtype"] == "uint32" and index["tokenizer"]["bos_id"] == TOKENIZER.bos_id
    assert not (tmp_path / "out" / "progress.json").exists() and not (tmp_path / "out" / "state").exists()


def test_blank_line_separated_documents(tmp_path):
    (tmp_path / "docs.txt").write_text("First doc,\nstill first.\n\n\nSecond doc.\n \t\nThird doc.\n\n")
    config = PrepareConfig(inputs=InputOptions(split_blank_lines=True), quality=QualityConfig.off())
    prepare([tmp_path / "docs.txt"], tmp_path / "out", TOKENIZER, config, workers=1, progress=False)
    assert decoded_documents(tmp_path / "out") == ["First doc,\nstill first.", "Second doc.", "Third doc."]


def test_dedup_and_filters_are_counted(tmp_path):
    good = [make_document(seed) for seed in range(10)]
    near = good[2].replace(".", "!", 1)  # changes 5 of 76 shingles: Jaccard about 0.88
    texts = good + [
        good[0].upper(),  # exact duplicate after normalization
        "  " + good[1].replace(" ", "   ") + "\n",  # exact duplicate after normalization
        near,  # near duplicate
        "Too short.",  # too_few_words
        "   \n",  # empty
        good[5] + " " + good[5],  # duplicate_ngram
    ]
    write_jsonl(tmp_path / "in.jsonl", texts)
    config = PrepareConfig(near_dedup=MinHashConfig())
    stats = prepare([tmp_path / "in.jsonl"], tmp_path / "out", TOKENIZER, config, workers=1, progress=False)
    assert decoded_documents(tmp_path / "out") == good
    assert stats.documents_read == len(texts) and stats.documents_kept == len(good)
    dropped = {k: v for k, v in stats.dropped.items() if v}
    assert dropped == {"exact_duplicate": 2, "near_duplicate": 1, "too_few_words": 1, "empty": 1, "duplicate_ngram": 1}
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["dropped"]["exact_duplicate"] == 2

    # Without near dedup the near copy is kept; without exact dedup the copies are too.
    config = PrepareConfig(exact_dedup=False)
    stats = prepare([tmp_path / "in.jsonl"], tmp_path / "out2", TOKENIZER, config, workers=1, progress=False)
    assert stats.documents_kept == len(good) + 3 and stats.dropped["exact_duplicate"] == 0


@pytest.fixture
def corpus(tmp_path):
    """Two JSONL files and a text directory: 60 documents, some duplicated, a few too short."""
    texts = [make_document(seed, n_words=40 + seed % 50) for seed in range(50)]
    texts += texts[:5] + ["short one"] * 5
    write_jsonl(tmp_path / "part1.jsonl", texts[:30])
    write_jsonl(tmp_path / "part2.jsonl", texts[30:])
    (tmp_path / "texts").mkdir()
    for i in range(4):
        (tmp_path / "texts" / f"{i}.txt").write_text(make_document(1000 + i))
    return [tmp_path / "part1.jsonl", tmp_path / "part2.jsonl", tmp_path / "texts"]


SMALL_SHARDS = PrepareConfig(quality=QualityConfig(min_words=10), near_dedup=MinHashConfig(), shard_tokens=700)


def test_shards_hold_whole_documents_and_workers_do_not_change_output(tmp_path, corpus):
    stats = prepare(corpus, tmp_path / "one", TOKENIZER, SMALL_SHARDS, workers=1, progress=False)
    index = json.loads((tmp_path / "one" / "index.json").read_text())
    assert stats.shards == len(index["shards"]) > 3
    for entry in index["shards"]:
        assert entry["tokens"] <= 700
        boundaries = np.load(tmp_path / "one" / entry["doc_boundaries"])
        assert boundaries[0] == 0 and boundaries[-1] == entry["tokens"] and len(boundaries) == entry["documents"] + 1
    assert stats.documents_kept == 54 and stats.dropped["exact_duplicate"] == 5 and stats.dropped["too_few_words"] == 5

    prepare(corpus, tmp_path / "two", TOKENIZER, SMALL_SHARDS, workers=2, progress=False)
    assert directory_bytes(tmp_path / "one") == directory_bytes(tmp_path / "two")


class SimulatedCrash(Exception):
    pass


def test_resume_after_crash_in_the_middle_of_a_shard(tmp_path, corpus, monkeypatch):
    prepare(corpus, tmp_path / "whole", TOKENIZER, SMALL_SHARDS, workers=1, progress=False)

    real_add = shards_module.ShardWriter.add
    calls = {"n": 0}

    def add_then_crash(self, *args):
        calls["n"] += 1
        if calls["n"] == 17:
            raise SimulatedCrash()
        real_add(self, *args)

    monkeypatch.setattr(shards_module.ShardWriter, "add", add_then_crash)
    with pytest.raises(SimulatedCrash):
        prepare(corpus, tmp_path / "resumed", TOKENIZER, SMALL_SHARDS, workers=1, progress=False)
    monkeypatch.undo()
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert 0 < len(progress["shards"]) < len(json.loads((tmp_path / "whole" / "index.json").read_text())["shards"])
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "resumed").iterdir())  # the half shard

    prepare(corpus, tmp_path / "resumed", TOKENIZER, SMALL_SHARDS, workers=2, progress=False)
    assert directory_bytes(tmp_path / "resumed") == directory_bytes(tmp_path / "whole")


def test_resume_when_a_shard_was_renamed_but_not_recorded(tmp_path, corpus, monkeypatch):
    prepare(corpus, tmp_path / "whole", TOKENIZER, SMALL_SHARDS, workers=1, progress=False)

    real_write = prepare_module.write_json_atomic
    writes = {"n": 0}

    def crash_on_second_progress(path, obj):
        if path.name == "progress.json":
            writes["n"] += 1
            if writes["n"] == 2:
                raise SimulatedCrash()
        real_write(path, obj)

    monkeypatch.setattr(prepare_module, "write_json_atomic", crash_on_second_progress)
    with pytest.raises(SimulatedCrash):
        prepare(corpus, tmp_path / "resumed", TOKENIZER, SMALL_SHARDS, workers=1, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "resumed" / "shard_00001.bin").exists()  # complete on disk, but not counted
    assert len(json.loads((tmp_path / "resumed" / "progress.json").read_text())["shards"]) == 1

    prepare(corpus, tmp_path / "resumed", TOKENIZER, SMALL_SHARDS, workers=1, progress=False)
    assert directory_bytes(tmp_path / "resumed") == directory_bytes(tmp_path / "whole")


def test_rerun_is_a_no_op_and_other_settings_need_overwrite(tmp_path, corpus):
    out = tmp_path / "out"
    first = prepare(corpus, out, TOKENIZER, SMALL_SHARDS, workers=1, progress=False)
    before = directory_bytes(out)
    assert prepare(corpus, out, TOKENIZER, SMALL_SHARDS, workers=1, progress=False) == first
    assert directory_bytes(out) == before
    other = PrepareConfig(quality=QualityConfig.off())
    with pytest.raises(DataError, match="other inputs or settings"):
        prepare(corpus, out, TOKENIZER, other, workers=1, progress=False)
    stats = prepare(corpus, out, TOKENIZER, other, workers=1, progress=False, overwrite=True)
    assert stats.documents_kept == 55 and TokenShards(out).num_documents == 55  # one "short one" stays
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.bin", "shard_00000.docs.npy"]


def _bad(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
        ("field.jsonl", b'{"body": "no text field"}\n', r"field\.jsonl:1: no field 'text' \(found 'body'\)"),
        ("type.jsonl", b'{"text": 42}\n', r"type\.jsonl:1: field 'text' holds int"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), r"latin1\.txt: not valid UTF-8"),
        ("fake.parquet", b"not parquet at all", r"fake\.parquet: not a readable Parquet file"),
    ],
)
def test_bad_input_gets_one_clear_error(tmp_path, name, content, message):
    path = _bad(tmp_path, name, content)
    for workers in (1, 2):
        with pytest.raises(DataError, match=message):
            prepare([path], tmp_path / f"out{workers}", TOKENIZER, NO_FILTERS, workers=workers, progress=False)


def test_missing_inputs_and_parquet_column(tmp_path):
    with pytest.raises(DataError, match="nowhere.txt: no such file"):
        prepare([tmp_path / "nowhere.txt"], tmp_path / "out", TOKENIZER, workers=1, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files"):
        prepare([tmp_path / "empty"], tmp_path / "out", TOKENIZER, workers=1, progress=False)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text' \(columns: body\)"):
        prepare([tmp_path / "t.parquet"], tmp_path / "out", TOKENIZER, workers=1, progress=False)


def test_cli_prepare(tmp_path, corpus, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="llama3")
    add_data_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(
        ["data", "prepare", *map(str, corpus), "--out", str(out), "--workers", "2", "--near-dedup",
         "--shard-tokens", "700", "--quality", "min_words=10", "--no-progress"]
    )
    cli_data(args)
    printed = capsys.readouterr().out
    assert re.search(r"documents kept +54 ", printed) and "exact_duplicate" in printed
    prepare(corpus, tmp_path / "api", TOKENIZER, SMALL_SHARDS, workers=1, progress=False)
    index = lambda d: {k: v for k, v in json.loads((d / "index.json").read_text()).items() if k != "fingerprint"}
    assert index(out)["shards"] == index(tmp_path / "api")["shards"]
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "prepare", "x.txt"])  # --out is required


def test_the_llama3_tokenizer_by_name(tmp_path):
    """`--tokenizer llama3` gives Meta's ids."""
    (tmp_path / "a.txt").write_text("This is a test sentence.")
    prepare([tmp_path / "a.txt"], tmp_path / "out", "llama3", NO_FILTERS, workers=1, progress=False)
    assert TokenShards(tmp_path / "out").document(0).tolist() == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]


def test_everything_dropped_still_gives_a_valid_empty_directory(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ["too short", "", "also too short"])
    stats = prepare([tmp_path / "in.jsonl"], tmp_path / "out", TOKENIZER, workers=1, progress=False)
    assert stats.documents_read == 3 and stats.documents_kept == 0 and stats.shards == 0
    assert stats.dropped["too_few_words"] == 2 and stats.dropped["empty"] == 1
    shards = TokenShards(tmp_path / "out")
    assert shards.num_documents == 0 and shards.num_tokens == 0
    assert re.search(r"documents kept +0  \(0.0%\)", stats.report())
