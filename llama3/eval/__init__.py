"""Evaluation: benchmark tasks read from local files in their published layouts, scored by log-likelihood,
by answer extraction from generated chains of thought, or by running generated code in a sandbox.

    from llama3.eval import evaluate, EvalOptions
    result = evaluate(llama3.load("smollm2-135m-instruct"), "mmlu", data_dir=Path("/data"), options=EvalOptions(shots=5))

The lm-evaluation-harness adapter (llama3.eval.lm_eval_adapter) is imported only by those who use it.
"""

from llama3.eval.tasks import TASKS, EvalOptions, evaluate

__all__ = ["TASKS", "EvalOptions", "evaluate"]
