"""Code tasks: HumanEval and MBPP, scored by running each completion against the task's tests in the sandbox.

pass@1 comes from one greedy completion per problem; with --samples n (sampled at --temperature) pass@k is
the unbiased estimate from n completions, for every k in 1, 10, 100 up to n.
  HumanEval  the prompt is the function signature and docstring; the model writes the body
  MBPP       "You are an expert Python programmer, and here is your task: <text> Your code should pass these
             tests:\\n\\n<asserts>\\n[BEGIN]\\n" after k solved examples; the completion ends at [DONE]
With --chat the task is a user message and the code is taken from the reply's ```python block.
"""

from __future__ import annotations

import re

from llama3.eval import generative
from llama3.eval.readers import CodeItem
from llama3.eval.results import TaskResult
from llama3.eval.sandbox import SandboxLimits, pass_at_k, run_programs

HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def code_from_reply(reply: str) -> str:
    """The first fenced code block of a chat reply, or the whole reply when it has none."""
    match = _CODE_BLOCK.search(reply)
    return match.group(1) if match else reply


def mbpp_task_text(item: CodeItem) -> str:
    tests = "\n".join(item.test_list)
    return f"You are an expert Python programmer, and here is your task: {item.prompt} Your code should pass these tests:\n\n{tests}\n"


def prompt_ids(model, task: str, item: CodeItem, examples: list[CodeItem], chat: bool) -> list[int]:
    if chat:
        if task == "humaneval":
            content = ("Complete the following Python function. Reply with the whole function in a ```python "
                       f"code block.\n\n```python\n{item.prompt}```")
        else:
            content = mbpp_task_text(item) + "Reply with the code in a ```python code block."
        return model.encode_chat([{"role": "user", "content": content}])
    if task == "humaneval":
        return model.encode_prompt(item.prompt)
    shots = "".join(f"{mbpp_task_text(ex)}[BEGIN]\n{ex.solution}\n[DONE]\n\n" for ex in examples)
    return model.encode_prompt(shots + mbpp_task_text(item) + "[BEGIN]\n")


def program(task: str, item: CodeItem, completion: str, chat: bool) -> str:
    """The file the sandbox runs: the solution, then the tests (which raise when it is wrong)."""
    if chat:
        completion = code_from_reply(completion)
        # HumanEval: the prompt's function (a docstring is a valid body) keeps its imports; the reply's
        # definition, coming later, replaces it
        return (item.prompt + "\n" if task == "humaneval" else "") + completion + "\n\n" + item.test
    if task == "humaneval":
        return item.prompt + completion + "\n\n" + item.test
    return completion + "\n\n" + item.test


def evaluate_code(model, task: str, items: list[CodeItem], pool: list[CodeItem], shots: int, chat: bool,
                  batch_size: int, samples: int = 1, temperature: float | None = None, max_new_tokens: int = 512,
                  limits: SandboxLimits = SandboxLimits(), seed: int = 1234, progress=None) -> TaskResult:
    run_programs(["pass"], limits)  # SandboxUnavailable now, not after generating every completion
    examples = pool[:shots]
    temperature = (0.0 if samples == 1 else 0.8) if temperature is None else temperature
    if samples > 1 and temperature == 0:
        raise ValueError("pass@k with several samples needs --temperature > 0 (greedy samples are all the same)")
    prompts = [generative.fit_prompt(prompt_ids(model, task, item, examples, chat), model.args.max_seq_len, max_new_tokens)
               for item in items]
    stop = () if chat else (HUMANEVAL_STOP if task == "humaneval" else ["[DONE]"])
    # every sample of every problem in one run of the engine; sample s of problem i is request s * n + i
    n = len(items)
    texts = generative.complete(model, prompts * samples, max_new_tokens=max_new_tokens, stop=stop,
                                temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,
                                seeds=[seed + 1000 * (r // n) + r % n for r in range(n * samples)],
                                max_batch=batch_size, progress=progress)
    completions = [texts[i::n] for i in range(n)]
    programs = [program(task, item, c, chat) for item, cs in zip(items, completions) for c in cs]
    results = iter(run_programs(programs, limits))
    passed_counts, records = [], []
    for item, cs in zip(items, completions):
        outcomes = [next(results) for _ in cs]
        passed_counts.append(sum(r.passed for r in outcomes))
        records.append({"id": item.id, "completion": cs[0], "status": [r.status for r in outcomes],
                        "error": next((r.stderr.strip().splitlines()[-1] for r in outcomes
                                       if not r.passed and r.stderr.strip()), ""),
                        "correct": outcomes[0].passed})
    metrics = {}
    for k in (1, 10, 100):
        if k <= samples:
            metrics[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in passed_counts) / max(1, len(items))
    return TaskResult(task, metrics, len(items), len(examples), 0.0, {}, records)
