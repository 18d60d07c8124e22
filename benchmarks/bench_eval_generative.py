"""Generative evaluation speed and agreement: `llama3 eval` against lm-eval + HF transformers on the same items.

GSM-8K (8-shot), MATH (4-shot) and HumanEval (0-shot) on the bundled samples, greedy, fp32, the default model.
lm-eval reads the very prompts ours builds (one local task per dataset, `doc_to_text: "{{prompt}}"`) with the same
stop strings and token limit, and its HF model (`hf`, the GGUF file loaded by transformers) writes the
completions. Per task and side: wall time (lm-eval's own overhead included; the model loads are not), the score of
each side's completions under our answer checks (extraction and the code sandbox), and how many completions are
identical; and the machine's 5-minute load average after the task. The runs alternate, ours first, per task.

Then the engine's own options on the same prompts (ours only, generation alone, each compared item for item with
the first): eager with prefix caching (the k-shot examples that the prompts share computed once: the share of
prompt tokens found cached is the hit rate), eager without it, and the compiled decoding step (torch.compile; its
first run, which compiles, is reported apart). `--gsm8k-items N` evaluates N GSM-8K-layout items made up by this
script (simple arithmetic word problems, 8 more as the k-shot pool) instead of the bundled sample, whose pool
has only 4.

    python benchmarks/bench_eval_generative.py [--tasks gsm8k,math,humaneval] [--limit N] [--max-new-tokens N]
        [--batch-size 8] [--repeats 1] [--shots K] [--gsm8k-items N] [--no-peer] [--no-engine-options]
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

from llama3.eval import codegen, generative  # noqa: E402
from llama3.eval.sandbox import run_programs  # noqa: E402
from llama3.eval.tasks import SAMPLES_DIR, TASKS, EvalOptions, evaluate, task_root  # noqa: E402
from llama3.generate import DecodeStep  # noqa: E402
from llama3.hub import DEFAULT_MODEL, resolve  # noqa: E402
from llama3.llama import Llama, load  # noqa: E402
from llama3.serve.metrics import ServeMetrics  # noqa: E402

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


def made_up_gsm8k(folder: Path, n: int, seed: int = 0) -> Path:
    """GSM-8K's layout ({train,test}.jsonl of question / "reasoning with <<calc>> notes\\n#### N") holding n test
    items and 8 training items: two-step word problems on random numbers."""
    import random

    rng = random.Random(seed)
    people, things = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"], ["apples", "books", "coins", "shells"]

    def item() -> dict:
        who, what = rng.choice(people), rng.choice(things)
        a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 9)
        total = a * b
        question = f"{who} has {a} bags with {b} {what} in each bag. {who} gives away {c} {what}. How many {what} are left?"
        answer = (f"{who} has {a} * {b} = <<{a}*{b}={total}>>{total} {what}.\nAfter giving away {c}, {total} - {c} = "
                  f"<<{total}-{c}={total - c}>>{total - c} are left.\n#### {total - c}")
        return {"question": question, "answer": answer}

    root = folder / "gsm8k-made-up"
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 8), ("test", n)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(item()) + "\n" for _ in range(count)))
    return root


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


def engine_options(llama, task: str, texts: list[str], items: list, max_new: int, batch_size: int) -> None:
    """Ours alone, generation only: eager with and without prefix caching, and compiled; item for item against the
    first."""
    stop = codegen.HUMANEVAL_STOP if task == "humaneval" else generative.FORMATS[TASKS[task].prompt_format].stop
    prompts = [llama.encode_prompt(t) for t in texts]
    compiled = Llama(llama.model, llama.tokenizer, llama.chat_format, llama.name, compile=True)
    runs = [("eager, prefix cache", llama, True), ("eager, no prefix cache", llama, False),
            ("compiled (compiling)", compiled, True), ("compiled", compiled, True)]
    first = None
    for name, model, caching in runs:
        metrics = ServeMetrics()
        start = time.perf_counter()
        completions = generative.complete(model, prompts, max_new_tokens=max_new, stop=stop, max_batch=batch_size,
                                          prefix_caching=caching, metrics=metrics)
        seconds = time.perf_counter() - start
        first = first or (seconds, completions)
        hits, queries = metrics.prefix_cache_hits.value(), metrics.prefix_cache_queries.value()
        same = sum(a == b for a, b in zip(completions, first[1]))
        print(f"    {name:<24} {seconds:>7.1f} s {first[0] / seconds:>5.2f}x  prefix cache hits {int(hits):>6} of "
              f"{int(queries):>6} prompt tokens ({hits / max(queries, 1):>4.0%})  same completions {same}/{len(items)}  "
              f"score {sum(score(task, items, completions))}/{len(items)}  load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", default="gsm8k,math,humaneval")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's (256 GSM-8K, 512 others)")
    parser.add_argument("--batch-size", type=int, default=8, help="both sides")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--shots", type=int, default=None, help="default: each task's (8 GSM-8K, 4 MATH, 0 HumanEval)")
    parser.add_argument("--gsm8k-items", type=int, default=None, help="made-up GSM-8K-layout items instead of the sample")
    parser.add_argument("--no-peer", action="store_true", help="skip lm-eval + HF")
    parser.add_argument("--no-engine-options", action="store_true", help="skip prefix caching off / compiled")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)  # lm-eval's notes on the local tasks' defaults

    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    llama = load(args.model, prepack=True)  # as `llama3 eval` loads it
    peer = None
    if not args.no_peer:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve(args.model)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        peer = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=args.batch_size)
    folder = Path(tempfile.mkdtemp(prefix="bench-eval-generative-"))
    made_up = made_up_gsm8k(folder, args.gsm8k_items) if args.gsm8k_items else None
    print(f"{'task':<10} {'n':>3} {'ours s':>8} {'lm-eval+HF s':>13} {'ratio':>6} {'ours':>6} {'peer':>6} "
          f"{'same completions':>17} {'same prompt ids':>16} {'load':>5}")
    for task in args.tasks.split(","):
        spec = TASKS[task]
        data_dir = made_up if task == "gsm8k" and made_up else None
        root = task_root(spec, data_dir) if data_dir else SAMPLES_DIR / spec.folder
        items = spec.reader(root, "eval")[: args.limit]
        pool = spec.reader(root, "fewshot")
        shots = spec.shots if args.shots is None else args.shots
        max_new = args.max_new_tokens or (generative.FORMATS[spec.prompt_format].max_new_tokens
                                          if spec.kind == "generative" else 512)
        texts = prompt_texts(task, items, pool, shots)
        if peer is None:
            print(f"{task:<10} {len(items):>3}  ({shots}-shot, engine only)")
            if not args.no_engine_options:
                engine_options(llama, task, texts, items, max_new, args.batch_size)
            continue
        ours_ids = [llama.encode_prompt(t) for t in texts]
        same_ids = sum(ids == peer.tok_encode(t) for ids, t in zip(ours_ids, texts))
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps({"prompt": t, "target": str(getattr(i, "answer", ""))}) + "\n"
                                for t, i in zip(texts, items)))
        until = list(codegen.HUMANEVAL_STOP if task == "humaneval" else generative.FORMATS[spec.prompt_format].stop)
        (folder / f"{task}.yaml").write_text(textwrap.dedent(YAML.format(task=task, data=data, until=json.dumps(until),
                                                                          max_new=max_new)))
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        options = EvalOptions(batch_size=args.batch_size, max_new_tokens=max_new, limit=args.limit, shots=shots)
        ours_s, peer_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            mine = evaluate(llama, task, data_dir, options=options)
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
        if not args.no_engine_options:
            engine_options(llama, task, texts, items, max_new, args.batch_size)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
