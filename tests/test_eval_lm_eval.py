"""Our multiple-choice numbers equal lm-evaluation-harness's, run through our adapter, on the same items.

lm-eval reads the shipped samples in their published layouts through local task YAML (no downloads) and
builds its own prompts; our evaluator builds its own. Equal per-item log-likelihoods mean equal prompts,
tokenization and scoring; equal accuracies mean equal metrics.
"""

import os
import shutil
import textwrap

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from llama3.eval.lm_eval_adapter import Llama3LM  # noqa: E402
from llama3.eval.tasks import SAMPLES_DIR, EvalOptions, evaluate  # noqa: E402
from test_eval_helpers import tiny_llama  # noqa: E402

S = SAMPLES_DIR
YAML = {
    "arc_easy": f"""
        task: sample_arc_easy
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {S}/arc/ARC-Easy/ARC-Easy-Test.jsonl
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
        doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
        doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """,
    "boolq": f"""
        task: sample_boolq
        dataset_path: json
        dataset_kwargs:
          data_files:
            validation: {S}/boolq/dev.jsonl
        test_split: validation
        output_type: multiple_choice
        doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
        doc_to_choice: ["no", "yes"]
        doc_to_target: "{{{{answer | int}}}}"
        metric_list:
          - metric: acc
        """,
    "winogrande": f"""
        task: sample_winogrande
        dataset_path: json
        dataset_kwargs:
          data_files:
            validation: {S}/winogrande/dev.jsonl
        test_split: validation
        output_type: multiple_choice
        doc_to_text: !function blanks.gold_index
        doc_to_choice: !function blanks.filled_contexts
        doc_to_target: !function blanks.rest_of_sentence
        metric_list:
          - metric: acc
        """,
    "mmlu": """
        task: sample_mmlu_college_biology
        dataset_path: csv
        dataset_kwargs:
          data_files:
            test: {root}/data/test/college_biology_test.csv
            dev: {root}/data/dev/college_biology_dev.csv
          column_names: [question, A, B, C, D, answer]
        test_split: test
        fewshot_split: dev
        fewshot_config:
          sampler: first_n
        num_fewshot: 5
        output_type: multiple_choice
        description: "The following are multiple choice questions (with answers) about college biology.\\n\\n"
        doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
        doc_to_choice: ["A", "B", "C", "D"]
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """,
}
# Winogrande scores the rest of the sentence after each option: the contexts differ, the continuation is shared.
BLANKS = """
def gold_index(doc):
    return int(doc["answer"]) - 1

def filled_contexts(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]]

def rest_of_sentence(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()
"""


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(max_seq_len=1024)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    # one MMLU subject, in the original layout
    mmlu = root / "mmlu"
    for split in ("dev", "test"):
        (mmlu / "data" / split).mkdir(parents=True)
        shutil.copy(S / "mmlu" / "data" / split / f"college_biology_{split}.csv", mmlu / "data" / split)
    for name, text in YAML.items():
        (root / f"{name}.yaml").write_text(textwrap.dedent(text.format(root=mmlu) if name == "mmlu" else text))
    (root / "blanks.py").write_text(BLANKS)
    return root


@pytest.fixture(scope="module")
def lm_eval_output(llama, task_dir):
    """All four tasks in one lm-eval run (indexing only our YAML, not lm-eval's own task library)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    tasks = ["sample_arc_easy", "sample_boolq", "sample_winogrande", "sample_mmlu_college_biology"]
    return lm_eval.simple_evaluate(model=Llama3LM(model=llama, batch_size=4), tasks=tasks, task_manager=manager,
                                   log_samples=True, bootstrap_iters=0)


@pytest.mark.parametrize("ours, theirs, shots", [("arc_easy", "sample_arc_easy", 0), ("boolq", "sample_boolq", 0),
                                                 ("winogrande", "sample_winogrande", 0),
                                                 ("mmlu", "sample_mmlu_college_biology", 5)])
def test_accuracy_equals_lm_eval_with_our_adapter(llama, task_dir, lm_eval_output, ours, theirs, shots):
    spec = f"mmlu:{task_dir / 'mmlu'}" if ours == "mmlu" else ours
    mine = evaluate(llama, spec, options=EvalOptions(shots=shots))
    out = lm_eval_output
    metrics = out["results"][theirs]
    assert metrics["acc,none"] == pytest.approx(mine.metrics["acc"])
    if "acc_norm,none" in metrics:
        assert metrics["acc_norm,none"] == pytest.approx(mine.metrics["acc_norm"])
    samples = sorted(out["samples"][theirs], key=lambda s: s["doc_id"])
    assert len(samples) == mine.n
    for theirs_sample, my_sample in zip(samples, mine.samples):
        their_logprobs = [float(resp[0]) for resp in theirs_sample["filtered_resps"]]
        assert their_logprobs == pytest.approx(my_sample["logprobs"], abs=1e-4)


def test_rolling_loglikelihood_and_generation_through_the_adapter(llama):
    from lm_eval.api.instance import Instance

    lm = Llama3LM(model=llama, batch_size=2)
    text = "The lighthouse stood at the end of a narrow stone pier."
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    mine = evaluate(llama, f"perplexity:{S / 'perplexity' / 'lighthouse.txt'}", options=EvalOptions(window=1024))
    assert total < 0
    (whole,) = lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])
    assert total == pytest.approx(whole[0], abs=1e-3)  # one window: the same as scoring the text after BOS
    assert mine.metrics["bits_per_byte"] > 0
    (completion,) = lm.generate_until([Instance("generate_until", {}, ("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert completion == llama.generate("Q: hi\nA:", max_new_tokens=5, stop=["\n"])


def test_cuda_asked_for_on_a_machine_without_it_means_the_cpu(monkeypatch):
    from llama3.eval.lm_eval_adapter import available_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert [available_device(d) for d in ("cuda:0", "cuda", None, "cpu")] == ["cpu"] * 4
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert [available_device(d) for d in ("cuda:0", None, "cpu")] == ["cuda:0", "cuda", "cpu"]
