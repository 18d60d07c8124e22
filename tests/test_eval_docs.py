"""The commands docs/EVAL.md shows, run as written on tiny inputs: a random 2-layer model with the default
model's tokenizer instead of the model the command names (or the default one), a few items per task and a few
generated tokens. Benchmark commands are measurements, run by hand; every other command line and Python example
of the page runs here, each in a fresh process on this machine's devices."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llama3.eval.tasks import SAMPLES_DIR

REPO = Path(__file__).parents[1]
PAGE = (REPO / "docs" / "EVAL.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", PAGE, re.DOTALL)
COMMANDS = [line for lang, text in BLOCKS if not lang
            for line in text.replace("\\\n", " ").splitlines()
            if line.startswith(("llama3 eval", "python -m llama3.eval")) and "[" not in line]  # not the synopsis
PYTHON = [text for lang, text in BLOCKS if lang == "python"]
NAMED_MODEL = "smollm2-135m-instruct"


def test_the_page_has_the_commands_this_file_runs():
    assert sum(c.startswith("llama3 eval") for c in COMMANDS) >= 2
    assert any("lm_eval_adapter run" in c for c in COMMANDS) and any("simple_evaluate" in p for p in PYTHON)


@pytest.fixture
def workdir(tmp_path):
    """A folder holding the page's task YAML (my_tasks/), its data paths pointed at the shipped samples."""
    (yaml,) = [text for lang, text in BLOCKS if lang == "yaml"]
    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "my_arc.yaml").write_text(yaml.replace("/data/", f"{SAMPLES_DIR}/"))
    return tmp_path


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c[:70] for c in COMMANDS])
def test_documented_command(command, workdir, tiny_model_dir):
    argv = shlex.split(command.replace(f"model={NAMED_MODEL}", f"model={tiny_model_dir}"))
    if argv[0] == "llama3":
        argv[:1] = [sys.executable, "-m", "llama3.cli"]
        if "--model" not in argv:
            argv += ["--model", str(tiny_model_dir)]
        argv += ["--limit", "2", "--max-new-tokens", "4"]  # the last of a repeated option counts
    else:
        argv[0] = sys.executable
        argv += ["--limit", "2"]
    out = _run(argv, workdir)
    if "lm_eval_adapter" in command:
        assert "my_arc" in out.stdout and "acc" in out.stdout
        return
    tasks = argv[argv.index("--tasks") + 1]
    for task in ("mmlu", "gsm8k", "humaneval") if tasks == "all" else tasks.split(","):
        assert task in out.stdout
    if "--output" in argv:
        results = json.loads((workdir / argv[argv.index("--output") + 1]).read_text())
        assert set(next(iter(results["results"].values()))) >= {"mmlu", "humaneval", "perplexity"}


@pytest.mark.slow
@pytest.mark.parametrize("code", PYTHON)
def test_documented_python(code, workdir, tiny_model_dir):
    code = code.replace(NAMED_MODEL, str(tiny_model_dir)).replace("simple_evaluate(", "simple_evaluate(limit=2, ")
    _run([sys.executable, "-c", code + "\nprint(sorted(out['results']))"], workdir)


LAYOUT = next(text for lang, text in BLOCKS if not lang and text.startswith("DIR/"))


def _expand(pattern: str) -> list[str]:
    """'a/{b,c}/<x>.json' -> ['a/b/*.json', 'a/c/*.json']"""
    pattern = re.sub(r"<[^>]+>", "*", pattern)
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return [pattern]
    return [p for option in match.group(1).split(",")
            for p in _expand(pattern[:match.start()] + option + pattern[match.end():])]


def test_the_documented_folder_layout_is_what_the_readers_read(tmp_path):
    from llama3.eval.tasks import TASKS, task_root

    lines = LAYOUT.split()
    folders = {line.split("/")[1] for line in lines}
    assert folders == {t.folder for t in TASKS.values()}
    for line in lines:  # every documented path is there in the samples, which are read as a --data-dir
        for pattern in _expand(line.removeprefix("DIR/")):
            assert list(SAMPLES_DIR.glob(pattern)), pattern
    for task in TASKS.values():
        if task.name not in ("gpqa_diamond", "gpqa_extended"):
            assert task.reader(task_root(task, SAMPLES_DIR), "eval")
    # any depth below the dataset's folder, as a release unpacks
    nested = tmp_path / "gsm8k" / "grade_school_math" / "data"
    nested.mkdir(parents=True)
    for name in ("train.jsonl", "test.jsonl"):
        (nested / name).write_text((SAMPLES_DIR / "gsm8k" / name).read_text())
    gsm8k = TASKS["gsm8k"]
    assert len(gsm8k.reader(task_root(gsm8k, tmp_path), "eval")) == len(gsm8k.reader(SAMPLES_DIR / "gsm8k", "eval"))
