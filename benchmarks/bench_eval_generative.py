"""Generative evaluation speed and agreement: `llama3 eval` against lm-eval + HF transformers on the same items.

GSM-8K (8-shot), MATH (4-shot) and HumanEval (0-shot) on the bundled samples, greedy, fp32, the default model.
lm-eval reads the very prompts ours builds (one local task per dataset, `doc_to_text: "{{prompt}}"`) with the same
stop strings and token limit, and its HF model (`hf`, the GGUF file loaded by transformers) writes the
completions. Per task and side: wall time (lm-eval's own overhead included; the model loads are not), the score of
each side's completions under our answer checks (extraction and the code sandbox), and how many completions are
identical; and the machine's 5-minute load average after the task. The runs alternate, ours first, per task.

    python benchmarks/bench_eval_generative.py [--tasks gsm8k,math,humaneval] [--limit N] [--max-new-tokens N]
        [--batch-size 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars

from llama3.eval import codegen, generative, readers  # noqa: E402
from llama3.eval.sandbox import run_programs  # noqa: E402
from llama3.eval.tasks import SAMPLES_DIR, TASKS, EvalOptions, evaluate  # noqa: E402
from llama3.hub import DEFAULT_MODEL, resolve  # noqa: E402
from llama3.llama import load  # noqa: E402

YAML = """
task: bench_{task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: {max_new}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def prompt_texts(task: str, items: list, pool: list, shots: int) -> list[str]:
    """The text of each prompt ours builds (base mode), for lm-eval to read."""
    if task == "humaneval":
        return [item.prompt for item in items]
    fmt = generative.FORMATS[TASKS[task].prompt_format]
    shots_for = generative.fixed_shots(pool or items, shots, 1234, avoid_self=not pool)
    return ["".join(fmt.question(ex) + fmt.worked(ex) + "\n\n" for ex in shots_for(item)) + fmt.question(item)
            for item in items]


def score(task: str, items: list, completions: list[str]) -> list[bool]:
    if task == "humaneval":
        return [r.passed for r in run_programs([codegen.program(task, i, c, False) for i, c in zip(items, completions)])]
    fmt = generative.FORMATS[TASKS[task].prompt_format]
    return [fmt.is_correct(fmt.extract(c), item) for item, c in zip(items, completions)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", default="gsm8k,math,humaneval")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's (256 GSM-8K, 512 others)")
    parser.add_argument("--batch-size", type=int, default=8, help="both sides")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.disable(logging.WARNING)  # lm-eval's notes on the local tasks' defaults

    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    llama = load(args.model, prepack=True)  # as `llama3 eval` loads it
    path = resolve(args.model)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    peer = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=args.batch_size)
    folder = Path(tempfile.mkdtemp(prefix="bench-eval-generative-"))
    print(f"{'task':<10} {'n':>3} {'ours s':>8} {'lm-eval+HF s':>13} {'ratio':>6} {'ours':>6} {'peer':>6} "
          f"{'same completions':>17} {'same prompt ids':>16} {'load':>5}")
    for task in args.tasks.split(","):
        spec = TASKS[task]
        root = SAMPLES_DIR / spec.folder
        items = spec.reader(root, "eval")[: args.limit]
        pool = spec.reader(root, "fewshot")
        max_new = args.max_new_tokens or (generative.FORMATS[spec.prompt_format].max_new_tokens
                                          if spec.kind == "generative" else 512)
        texts = prompt_texts(task, items, pool, spec.shots)
        ours_ids = [llama.encode_prompt(t) for t in texts]
        same_ids = sum(ids == peer.tok_encode(t) for ids, t in zip(ours_ids, texts))
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps({"prompt": t, "target": str(getattr(i, "answer", ""))}) + "\n"
                                for t, i in zip(texts, items)))
        until = list(codegen.HUMANEVAL_STOP if task == "humaneval" else generative.FORMATS[spec.prompt_format].stop)
        (folder / f"{task}.yaml").write_text(textwrap.dedent(YAML.format(task=task, data=data, until=json.dumps(until),
                                                                          max_new=max_new)))
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        options = EvalOptions(batch_size=args.batch_size, max_new_tokens=max_new, limit=args.limit)
        ours_s, peer_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            mine = evaluate(llama, task, options=options)
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            theirs = lm_eval.simple_evaluate(model=peer, tasks=[f"bench_{task}"], task_manager=manager,
                                             log_samples=True, bootstrap_iters=0)
            peer_s.append(time.perf_counter() - start)
        ours_completions = [s["completion"] for s in mine.samples]
        samples = sorted(theirs["samples"][f"bench_{task}"], key=lambda s: s["doc_id"])
        peer_completions = [s["resps"][0][0] for s in samples]
        ours_ok, peer_ok = score(task, items, ours_completions), score(task, items, peer_completions)
        same = sum(a == b for a, b in zip(ours_completions, peer_completions))
        o, p = min(ours_s), min(peer_s)
        print(f"{task:<10} {len(items):>3} {o:>8.1f} {p:>13.1f} {p / o:>5.1f}x {sum(ours_ok):>3}/{len(items):<2} "
              f"{sum(peer_ok):>3}/{len(items):<2} {same:>13}/{len(items):<3} {same_ids:>12}/{len(items):<3} "
              f"{os.getloadavg()[1]:>5.1f}", flush=True)
        for i, (a, b) in enumerate(zip(ours_completions, peer_completions)):
            if a != b:
                print(f"    item {i} differs: ours {a[:80]!r} / peer {b[:80]!r}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
