"""lm-evaluation-harness adapter: our models as the `llama3` model type.

    import lm_eval, llama3.eval.lm_eval_adapter  # importing registers "llama3"
    lm_eval.simple_evaluate(model="llama3", model_args="model=smollm2-135m-instruct,batch_size=8",
                            tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path="my_yaml_dir"))

From the shell, `python -m llama3.eval.lm_eval_adapter run --model llama3 --model_args model=... --tasks ...
--include_path DIR` is lm-eval's own CLI with the adapter registered. Nothing is downloaded: the model is loaded
by `llama3.load`, and tasks should read local files (dataset_path: json / csv / parquet with data_files).
Scoring goes through the same Scorer as `llama3 eval`, so both give the same numbers on the same prompts.

Only this module imports lm_eval; the rest of the package never imports this module.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llama3.eval import generative
from llama3.eval.scoring import Request, Scorer, rolling_requests, uses_bos

log = logging.getLogger("llama3.eval")


def available_device(device: str | None) -> str:
    """The device asked for, except that CUDA on a machine without it means the CPU: lm-eval's command line asks
    for cuda:0 unless told otherwise, and its users on CPU-only machines mean "the device I have"."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("%s asked for, but this machine has no CUDA device: computing on the CPU", device)
        return "cpu"
    return str(device)


@register_model("llama3")
class Llama3LM(TemplateLM):
    def __init__(self, model="smollm2-135m-instruct", batch_size: int | str = 8, dtype: str | None = None,
                 device: str | None = None, max_length: int | None = None, **_ignored):
        super().__init__()
        if isinstance(model, str):
            from llama3.llama import load

            model = load(model, dtype=dtype, device=available_device(device), prepack=True)
        self.llama = model
        self.tokenizer_ = model.tokenizer
        self.max_length = max_length or model.args.max_seq_len
        self.batch_size = 8 if batch_size in ("auto", None) else int(batch_size)
        self.scorer = Scorer(model.model, vocab_size=model.args.vocab_size, batch_size=self.batch_size,
                             max_seq_len=self.max_length)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        # an empty context is conditioned on BOS, as every prompt of ours starts
        return self.tokenizer_.bos_id if uses_bos(self.tokenizer_) else self.tokenizer_.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = uses_bos(self.tokenizer_) if add_special_tokens is None else add_special_tokens and uses_bos(self.tokenizer_)
        return self.tokenizer_.encode(string, bos=bos)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = self.scorer.loglikelihood([Request(tuple(ctx), tuple(cont)) for _, ctx, cont in requests])
        answers = []
        for (cache_key, _, _), score in zip(requests, scored):
            answer = (score.logprob, score.is_greedy)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix = [self.prefix_token_id]
        out = []
        for request in requests:
            (text,) = request.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            windows = rolling_requests(tokens, prefix, self.max_length)
            total = sum(s.logprob for s in self.scorer.loglikelihood(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """All requests through the serving engine at once, one engine run per distinct set of generation
        options (a task has one)."""
        groups: dict[tuple, list[int]] = {}
        prompts = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
            prompts.append(self.tok_encode(context)[-(self.max_length - max_new):])
            groups.setdefault((until, max_new, temperature), []).append(i)
        out = [""] * len(requests)
        for (until, max_new, temperature), members in groups.items():
            texts = generative.complete(self.llama, [prompts[i] for i in members], max_new_tokens=max_new, stop=until,
                                        temperature=temperature, max_batch=self.batch_size)
            for i, text in zip(members, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main() -> None:
    """lm-eval's command line with the `llama3` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm-eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
