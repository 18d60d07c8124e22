"""`llama3 eval`: run benchmark tasks on one or more models; print a table, optionally write JSON and a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama3.eval.results import TaskResult, format_table, plot_comparison, to_json
from llama3.eval.sandbox import SandboxLimits
from llama3.eval.tasks import TASKS, EvalOptions, TaskError, evaluate, parse_task, task_root


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="evaluate models on benchmark tasks (MMLU, ARC, GSM-8K, HumanEval, ...)",
        description="Evaluate models on benchmark tasks read from local files in their published layouts. "
        f"Tasks: {', '.join(TASKS)}. Without --data-dir, the small samples shipped with llama3 are used.")
    p.add_argument("--model", default=None,
                   help="model(s), comma-separated: known name, .gguf file, or checkpoint directory (default: the default model)")
    p.add_argument("--tasks", default="mmlu", help="comma-separated tasks, 'all', or name:path to point one task at its files")
    p.add_argument("--data-dir", type=Path, default=None, help="folder holding one sub-folder per dataset (mmlu/, gsm8k/, ...)")
    p.add_argument("--shots", type=int, default=None, help="k-shot examples (default: each task's published setting)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each task")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template (instruct models)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per scoring forward pass; completions the engine decodes together")
    p.add_argument("--samples", type=int, default=1, help="completions per code problem; pass@k for k <= samples")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature for code tasks (default 0, or 0.8 with --samples > 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length (default: 256 GSM-8K, 512 MATH and code)")
    p.add_argument("--window", type=int, default=1024, help="perplexity: context window in tokens")
    p.add_argument("--timeout", type=float, default=10.0, help="code tasks: seconds per program")
    p.add_argument("--allow-unisolated-code", action="store_true",
                   help="code tasks on a machine that cannot create namespaces: run model-written code without them, "
                   "where it can read every file you can (default: refuse)")
    p.add_argument("--output", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="include every item's prediction in the JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart comparing the models here")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization while loading (the model then computes in bf16)")
    p.add_argument("--compile", action="store_true",
                   help="generation's decoding steps through torch.compile (tens of seconds once per model, then "
                   "faster tokens; with --quantize too)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="nothing on stderr (no progress bars, no per-task lines): only "
                   "the table")
    p.set_defaults(func=cli_eval)
    return p


def _progress_factory(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def factory(description: str, total: int):
        bar = tqdm(total=total or None, desc=description, unit="req", leave=False, file=sys.stderr)
        return bar.update

    return factory


def cli_eval(args: argparse.Namespace) -> dict[str, list[TaskResult]]:
    from llama3.hub import DEFAULT_MODEL
    from llama3.llama import load

    specs = list(TASKS) if args.tasks.strip() == "all" else [t for t in args.tasks.split(",") if t.strip()]
    if not specs:
        raise TaskError("--tasks is empty")
    if args.tasks.strip() == "all":
        specs = [t for t in specs if not t.startswith("gpqa_")]  # variants of gpqa, each needs its own file
    for spec in specs:  # bad task names and missing folders fail before any model loads
        task, explicit = parse_task(spec)
        task_root(task, args.data_dir, explicit)
    models = [m.strip() for m in (args.model or DEFAULT_MODEL).split(",") if m.strip()]
    options = EvalOptions(shots=args.shots, limit=args.limit, chat=args.chat, batch_size=args.batch_size,
                          samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          window=args.window, sandbox=SandboxLimits(timeout_s=args.timeout, cpu_seconds=int(args.timeout),
                                                isolate=not args.allow_unisolated_code))
    progress = _progress_factory(args.quiet)
    results: dict[str, list[TaskResult]] = {}
    for name in models:
        llama = load(name, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile,
                     prepack=True)
        results[name] = []
        for spec in specs:
            result = evaluate(llama, spec, args.data_dir, options, progress)
            results[name].append(result)
            if not args.quiet:
                    print(f"{name} {result.task}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()
                                                             if not k.endswith("_stderr")) + f" ({result.seconds:.1f}s)",
                      file=sys.stderr)
    print(format_table(results))
    if args.output:
        # the options as given; argparse also carries the verb's function (func, _run), which is no option
        config = {k: v for k, v in vars(args).items() if not callable(v)}
        args.output.write_text(to_json(results, config, include_samples=args.log_samples))
    if args.plot:
        plot_comparison(results, args.plot)
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m llama3.eval.cli ...`: the same verb without the `llama3` front end."""
    parser = argparse.ArgumentParser(prog="llama3")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"llama3 eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
