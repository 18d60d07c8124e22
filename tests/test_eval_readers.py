import gzip
import json

import pytest

from llama3.eval import readers
from llama3.eval.readers import DatasetError
from llama3.eval.tasks import SAMPLES_DIR, TASKS, task_root


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_reads_its_shipped_sample(name):
    task = TASKS[name]
    if name in ("gpqa_diamond", "gpqa_extended"):
        with pytest.raises(DatasetError, match=f"gpqa_{name.split('_')[1]}.csv"):
            task.reader(task_root(task, None), "eval")
        return
    items = task.reader(task_root(task, None), "eval")
    assert len(items) >= 2
    for item in items:
        if task.kind == "multiple_choice":
            assert 0 <= item.answer < len(item.choices)


def test_mmlu_csv_and_parquet_layouts_agree(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    csv_items = readers.read_mmlu(SAMPLES_DIR / "mmlu", "eval")
    # the parquet export: <subject>/test-00000-of-00001.parquet with choices as a list and answer as an index,
    # plus an "all" folder repeating everything
    for folder in ["all"] + sorted({i.subject for i in csv_items}):
        rows = [i for i in csv_items if folder in ("all", i.subject)]
        table = pa.table({"question": [i.question for i in rows], "subject": [i.subject for i in rows],
                          "choices": [i.choices for i in rows], "answer": [i.answer for i in rows]})
        (tmp_path / folder).mkdir()
        pq.write_table(table, tmp_path / folder / "test-00000-of-00001.parquet")
    parquet_items = readers.read_mmlu(tmp_path, "eval")
    key = lambda i: (i.subject, i.question, tuple(i.choices), i.answer)  # noqa: E731
    assert sorted(map(key, parquet_items)) == sorted(map(key, csv_items))


def test_mmlu_few_shot_examples_come_from_dev():
    dev = readers.read_mmlu(SAMPLES_DIR / "mmlu", "fewshot")
    assert {i.subject for i in dev} == {"elementary_mathematics", "high_school_geography", "college_biology"}
    assert sum(i.subject == "college_biology" for i in dev) == 5


def test_arc_flattened_parquet_rows_and_numeric_labels(tmp_path):
    rows = [{"id": "x1", "question": "Which is a planet?", "choices": {"text": ["Mars", "Moon"], "label": ["1", "2"]},
             "answerKey": "1"}]
    (tmp_path / "ARC-Challenge-Test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = readers.arc_reader("Challenge")(tmp_path, "eval")
    assert items[0].choices == ["Mars", "Moon"] and items[0].answer == 0 and items[0].question == "Which is a planet?"


def test_humaneval_gzip(tmp_path):
    src = (SAMPLES_DIR / "humaneval" / "HumanEval.jsonl").read_bytes()
    (tmp_path / "HumanEval.jsonl.gz").write_bytes(gzip.compress(src))
    items = readers.read_humaneval(tmp_path, "eval")
    assert items[0].id == "HumanEval/0" and items[0].test.rstrip().endswith("check(sum_of_squares)")


def test_math_jsonl_with_answer_field(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps(
        {"problem": "What is 2+2?", "solution": "It is 4.", "answer": "4", "subject": "Prealgebra", "level": 1,
         "unique_id": "test/prealgebra/1.json"}) + "\n")
    (item,) = readers.read_math(tmp_path, "eval")
    assert item.answer == "4" and item.subject == "Prealgebra" and item.id == "test/prealgebra/1.json"


def test_mbpp_is_split_by_task_id():
    test = readers.read_mbpp(SAMPLES_DIR / "mbpp", "eval")
    prompt = readers.read_mbpp(SAMPLES_DIR / "mbpp", "fewshot")
    assert [i.id for i in test] == ["11", "12", "13", "14", "15"]
    assert [i.id for i in prompt] == ["1", "2", "3"]


def test_gpqa_choices_are_shuffled_the_same_way_every_time():
    a = readers.gpqa_reader("main")(SAMPLES_DIR / "gpqa", "eval")
    b = readers.gpqa_reader("main")(SAMPLES_DIR / "gpqa", "eval")
    assert a == b
    assert {i.answer for i in a} != {0}  # the file lists the correct answer first; the items must not
    for item in a:
        assert item.choices[item.answer] in ("9 J", "3", "1/4", "3 ohm")


def test_hellaswag_markers_are_cleaned():
    items = readers.read_hellaswag(SAMPLES_DIR / "hellaswag", "eval")
    last = items[-1]
    assert "[" not in last.question and "[" not in last.choices[0]
    assert last.question == "Home and Garden: How to water a plant. Check the soil. Touch the soil with your finger to see if it is dry."
    assert last.choices[0] == " If the soil is dry, pour water slowly around the base of the plant."  # as lm-eval cleans it


@pytest.mark.parametrize(
    "filename, content, message",
    [
        ("dev.jsonl", '{"question": "q", "passage": "p"}\n', "field 'label'"),
        ("dev.jsonl", '{"question": "q"\n', "dev.jsonl:1: not valid JSON"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, filename, content, message):
    (tmp_path / filename).write_text(content)
    with pytest.raises(DatasetError, match=message):
        readers.read_boolq(tmp_path, "eval")


def test_bad_mmlu_row_and_missing_files(tmp_path):
    (tmp_path / "x_test.csv").write_text("question,A,B,C,D,E\n")
    with pytest.raises(DatasetError, match="x_test.csv: row 1"):
        readers.read_mmlu(tmp_path, "eval")
    with pytest.raises(DatasetError, match="no GSM-8K test file"):
        readers.read_gsm8k(tmp_path, "eval")
    (tmp_path / "dev.jsonl").write_text('{"qID": "1", "sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n')
    with pytest.raises(DatasetError, match="no '_' blank"):
        readers.read_winogrande(tmp_path, "eval")
