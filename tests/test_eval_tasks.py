import json
from dataclasses import replace
import math
import re

import pytest
from PIL import Image

from llama3.eval import readers
from llama3.eval.cli import main as eval_main
from llama3.eval.multiple_choice import FORMATS
from llama3.eval.results import format_table
from llama3.eval.scoring import Scorer, encode_pair
from llama3.eval.tasks import SAMPLES_DIR, TASKS, EvalOptions, TaskError, evaluate
from test_eval_helpers import tiny_llama

FAST = EvalOptions(max_new_tokens=8, batch_size=4, window=128)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(max_seq_len=1024)


@pytest.mark.parametrize("name", [n for n in TASKS if n not in ("gpqa_diamond", "gpqa_extended")])
def test_every_task_runs_on_its_sample(llama, name):
    result = evaluate(llama, name, options=FAST)
    assert result.n >= 2 and result.seconds > 0
    for metric, value in result.metrics.items():
        if metric in ("acc", "acc_norm", "exact_match", "pass@1"):
            assert 0 <= value <= 1
        else:
            assert math.isfinite(value)
    assert name in format_table({"tiny": [result]})


def test_mmlu_prompt_is_the_five_shot_hendrycks_format(llama):
    result = evaluate(llama, "mmlu", options=EvalOptions(limit=1))
    dev = [i for i in readers.read_mmlu(SAMPLES_DIR / "mmlu", "fewshot") if i.subject == "college_biology"]
    item = readers.read_mmlu(SAMPLES_DIR / "mmlu", "eval")[0]
    shots = "".join(f"{d.question}\nA. {d.choices[0]}\nB. {d.choices[1]}\nC. {d.choices[2]}\nD. {d.choices[3]}\n"
                    f"Answer: {'ABCD'[d.answer]}\n\n" for d in dev)
    prompt = (f"The following are multiple choice questions (with answers) about college biology.\n\n{shots}"
              f"{item.question}\nA. {item.choices[0]}\nB. {item.choices[1]}\nC. {item.choices[2]}\nD. {item.choices[3]}\nAnswer:")
    scorer = Scorer(llama.model, vocab_size=512)
    expected = [s.logprob for s in scorer.loglikelihood([encode_pair(llama.tokenizer, prompt, f" {x}") for x in "ABCD"])]
    assert result.samples[0]["logprobs"] == pytest.approx(expected, abs=1e-4)
    assert result.shots == 5
    assert set(result.breakdown) == {"college_biology"}


def test_winogrande_scores_the_rest_of_the_sentence_after_each_option():
    item = readers.read_winogrande(SAMPLES_DIR / "winogrande", "eval")[0]
    pairs = FORMATS["partial"].pairs(item)
    assert pairs == [("The trophy did not fit in the suitcase because the trophy", " was too small."),
                     ("The trophy did not fit in the suitcase because the suitcase", " was too small.")]


class ChatTemplate:
    """A minimal chat format over the byte tokenizer: role tags, then an open assistant turn."""

    def __init__(self, tokenizer):
        self.tokenizer, self.dialogs = tokenizer, []

    def encode_dialog_prompt(self, messages, tools=None):
        self.dialogs.append(messages)
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"
        return self.tokenizer.encode(text, bos=True)


def test_chat_mode_asks_a_lettered_question_and_scores_the_letter(llama):
    from llama3.eval.scoring import Request

    template = llama.chat_format = ChatTemplate(llama.tokenizer)
    try:
        zero_shot = evaluate(llama, "arc_easy", options=EvalOptions(chat=True, shots=0, limit=1))
        evaluate(llama, "arc_easy", options=EvalOptions(chat=True, shots=2, limit=1))
    finally:
        llama.chat_format = None
    item = readers.arc_reader("Easy")(SAMPLES_DIR / "arc", "eval")[0]
    question = (f"Question: {item.question}\nA. light\nB. wind\nC. rain\nD. snow\n"
                "Answer with the letter of the correct option.")
    context = tuple(llama.tokenizer.encode(f"<user>{question}</><assistant>", bos=True))
    expected = Scorer(llama.model, vocab_size=512).loglikelihood([Request(context, (ord(x),)) for x in "ABCD"])
    assert zero_shot.samples[0]["logprobs"] == pytest.approx([s.logprob for s in expected], abs=1e-4)
    # k-shot examples are earlier turns: user question, assistant letter
    roles = [m["role"] for m in template.dialogs[-1]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert all(len(m["content"]) == 1 for m in template.dialogs[-1] if m["role"] == "assistant")


class Scripted:
    """Stands in for a Llama whose completions are known: looks each prompt's last question up in `answers`
    (generative.complete hands it the prompts; see the fixture below)."""

    def __init__(self, llama, answers: dict[str, str]):
        self.llama, self.answers, self.prompts = llama, answers, []
        self.model, self.tokenizer, self.args, self.chat_format = llama.model, llama.tokenizer, llama.args, None

    def encode_prompt(self, text):
        return self.llama.encode_prompt(text)

    def complete(self, prompts, **kwargs):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            key = max((k for k in self.answers if k in text), key=text.rindex)
            reply = self.answers[key]
            for stop in kwargs.get("stop") or []:  # as the engine: the text ends before a stop string
                reply = reply.split(stop)[0]
            out.append(reply)
        return out


@pytest.fixture(autouse=True)
def scripted_completions(monkeypatch):
    from llama3.eval import generative

    real = generative.complete
    monkeypatch.setattr(generative, "complete", lambda model, prompts, **kw: model.complete(prompts, **kw)
                        if isinstance(model, Scripted) else real(model, prompts, **kw))


def test_gsm8k_extracts_and_matches_answers(llama):
    items = readers.read_gsm8k(SAMPLES_DIR / "gsm8k", "eval")
    # right, right with different formatting, wrong, none, then the rest right
    replies = ["So she has 3 * 10 = 30 stickers. The answer is 30.", "Each box has $8.00. The answer is $8.",
               "The answer is 44.", "I don't know."]
    answers = {item.question: replies[i] if i < len(replies) else f"The answer is {item.answer}."
               for i, item in enumerate(items)}
    scripted = Scripted(llama, answers)
    result = evaluate(scripted, "gsm8k", options=EvalOptions(shots=2))
    assert result.metrics["exact_match"] == pytest.approx(4 / 6)
    assert [s["correct"] for s in result.samples] == [True, True, False, False, True, True]
    # the prompt: two worked examples (calculator notes removed) then the question
    prompt = scripted.prompts[0]
    assert prompt.count("Question:") == 3 and "<<" not in prompt and "The answer is" in prompt
    assert prompt.endswith("\nAnswer:")


def test_math_minerva_answers_are_normalized(llama):
    items = readers.read_math(SAMPLES_DIR / "math", "eval")
    answers = {item.question: f"Final Answer: The final answer is ${item.answer}$. I hope it is correct."
               for item in items}
    three_quarters = next(i for i in items if i.answer == "\\frac{3}{4}")
    answers[three_quarters.question] = "Final Answer: The final answer is $0.75$. I hope it is correct."
    answers[items[0].question] = "so the answer is \\boxed{31}"  # wrong
    result = evaluate(Scripted(llama, answers), "math", options=EvalOptions(shots=1))
    assert result.metrics["exact_match"] == pytest.approx(5 / 6)
    assert "Algebra" in result.breakdown


def test_code_tasks_run_completions_against_the_tests(llama):
    items = readers.read_humaneval(SAMPLES_DIR / "humaneval", "eval")
    answers = {item.prompt: item.solution for item in items}
    answers[items[0].prompt] = "    return sum(numbers)\n"  # wrong
    answers[items[1].prompt] = "    while True:\n        pass\n"  # never ends
    options = EvalOptions(sandbox=readers_limits())
    result = evaluate(Scripted(llama, answers), "humaneval", options=options)
    assert result.metrics["pass@1"] == pytest.approx(3 / 5)
    assert result.samples[1]["status"] == ["timeout"]

    mbpp = readers.read_mbpp(SAMPLES_DIR / "mbpp", "eval")
    mbpp_answers = {item.prompt: item.solution + "\n[DONE]" for item in mbpp}
    result = evaluate(Scripted(llama, mbpp_answers), "mbpp", options=options)
    assert result.metrics["pass@1"] == 1.0


def readers_limits():
    from llama3.eval.sandbox import SandboxLimits

    return SandboxLimits(timeout_s=2.0, cpu_seconds=1)


def test_pass_at_k_with_samples(llama):
    items = readers.read_humaneval(SAMPLES_DIR / "humaneval", "eval")[:2]

    class Alternating(Scripted):
        def complete(self, prompts, **kwargs):
            assert kwargs["temperature"] > 0
            assert len(prompts) == 6 and len(set(kwargs["seeds"])) == 6  # 3 samples of 2 problems, seeded apart
            # sample 1 right for both problems, samples 2 and 3 wrong
            return [items[r].solution if r < 2 else "    return None\n" for r in range(len(prompts))]

    options = EvalOptions(samples=3, limit=2, sandbox=readers_limits())
    result = evaluate(Alternating(llama, {}), "humaneval", options=options)
    assert result.metrics["pass@1"] == pytest.approx(1 / 3)
    assert "pass@10" not in result.metrics


def test_engine_completions_equal_greedy_generation(llama):
    # the engine (continuous batching, rows joining and leaving) writes what one plain batch would, stop strings
    # included; prompts of different lengths, more of them than run at once
    from llama3.eval.generative import complete

    prompts = [llama.encode_prompt(p) for p in ["Question: 1+1?\nAnswer:", "x", "The end of the pier", "ab" * 20, "q"]]
    plain = [llama.complete_ids([p], max_new_tokens=12)[0] for p in prompts]
    stop = tuple(text[2:4] for text in plain if len(text) > 4)  # strings these completions do write
    stopped = [llama.complete_ids([p], max_new_tokens=12, stop=list(stop))[0] for p in prompts]
    assert stopped != plain
    assert complete(llama, prompts, max_new_tokens=12, max_batch=2) == plain
    assert complete(llama, prompts, max_new_tokens=12, stop=stop, max_batch=2) == stopped


def test_the_k_shot_prefix_is_computed_once(llama):
    # the prompts share their k-shot examples: all but the first find those blocks in the prefix cache, even
    # though they are all queued at once (prompts admitted together would each compute their own copy)
    from llama3.eval.generative import complete, prompt_ids, FORMATS
    from llama3.serve.metrics import ServeMetrics

    items, pool = readers.read_gsm8k(SAMPLES_DIR / "gsm8k", "eval"), readers.read_gsm8k(SAMPLES_DIR / "gsm8k", "fewshot")
    prompts = [prompt_ids(llama, FORMATS["gsm8k"], item, pool[:3], chat=False) for item in items]
    shared = next(i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1)
    runs = {}
    for caching in (True, False):
        metrics = ServeMetrics()
        runs[caching] = complete(llama, prompts, max_new_tokens=6, max_batch=8, prefix_caching=caching, metrics=metrics)
        assert metrics.prefix_cache_queries.value() == sum(map(len, prompts))
        hits = metrics.prefix_cache_hits.value()
    assert hits == 0 and runs[True] == runs[False]
    reused = (len(prompts) - 1) * (shared // 16 * 16)  # whole blocks of 16 tokens
    assert reused > 0.8 * (len(prompts) - 1) * shared
    with_cache = ServeMetrics()
    complete(llama, prompts, max_new_tokens=6, max_batch=8, metrics=with_cache)
    assert with_cache.prefix_cache_hits.value() == reused


@pytest.mark.slow  # compiles the decoding step (about a minute on two busy cores)
def test_compiled_generation_gives_the_same_answers(llama):
    from llama3.llama import Llama

    import torch

    compiled = Llama(llama.model, llama.tokenizer, None, compile=True)
    options = EvalOptions(shots=1, max_new_tokens=24, batch_size=3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, fast = (evaluate(m, "gsm8k", options=options) for m in (llama, compiled))
    assert compiled.decode_step.compile_seconds > 0  # it did compile
    # batches of 3, 2 and 1 rows, contexts growing past block boundaries, and a second task's engine: one graph
    evaluate(compiled, "math", options=replace(options, limit=2))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert [s["completion"] for s in fast.samples] == [s["completion"] for s in eager.samples]
    assert [s["prediction"] for s in fast.samples] == [s["prediction"] for s in eager.samples]
    assert len({s["completion"] for s in eager.samples}) > 1  # the items' answers differ


@pytest.mark.slow  # compiles the decoding step of an int8 model
def test_compiled_quantized_generation_gives_the_quantized_answers(llama):
    import copy

    from llama3.llama import Llama
    from llama3.quantize import quantize_model

    int8 = quantize_model(copy.deepcopy(llama.model), "int8")
    eager, compiled = (Llama(int8, llama.tokenizer, None, compile=c) for c in (False, True))
    options = EvalOptions(shots=1, max_new_tokens=16, batch_size=3)
    slow, fast = (evaluate(m, "gsm8k", options=options) for m in (eager, compiled))
    assert compiled.decode_step.compile_seconds > 0
    assert [s["completion"] for s in fast.samples] == [s["completion"] for s in slow.samples]


def test_perplexity_matches_one_pass_over_a_short_file(llama, tmp_path):
    import torch

    text = "a short line of text"
    (tmp_path / "a.txt").write_text(text)
    result = evaluate(llama, f"perplexity:{tmp_path}", options=EvalOptions(window=512))
    tokens = llama.tokenizer.encode(text, bos=True)
    with torch.no_grad():
        logprobs = torch.log_softmax(llama.model(torch.tensor([tokens]))[0].double(), -1)
    total = sum(float(logprobs[i, tokens[i + 1]]) for i in range(len(tokens) - 1))
    assert result.metrics["bits_per_byte"] == pytest.approx(-total / math.log(2) / len(text.encode()), rel=1e-5)


def test_unknown_task_and_chat_without_template(llama):
    with pytest.raises(TaskError, match="unknown task 'mmlux'"):
        evaluate(llama, "mmlux")
    with pytest.raises(ValueError, match="no chat format"):
        evaluate(llama, "boolq", options=EvalOptions(chat=True))


def test_cli_writes_table_json_and_png(llama, tmp_path, monkeypatch, capsys):
    models = {"tiny-a": llama, "tiny-b": tiny_llama(seed=1, max_seq_len=1024)}
    monkeypatch.setattr("llama3.llama.load", lambda name, **_: models[name])
    out, png = tmp_path / "results.json", tmp_path / "chart.png"
    code = eval_main(["eval", "--model", "tiny-a,tiny-b", "--tasks", "boolq,gsm8k", "--limit", "2", "--shots", "1",
                      "--max-new-tokens", "4", "--output", str(out), "--plot", str(png), "--log-samples"])
    assert code == 0
    table, err = capsys.readouterr()
    assert "tiny-a" in table and "tiny-b" in table and "gsm8k" in table
    assert re.search(r"tiny-b gsm8k: exact_match=\d\.\d+ \(\d+\.\ds\)", err)  # each task's result and time
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"tiny-a", "tiny-b"}
    assert data["results"]["tiny-a"]["boolq"]["n"] == 2 and len(data["results"]["tiny-a"]["gsm8k"]["samples"]) == 2
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.format == "PNG"
    assert eval_main(["eval", "--model", "tiny-a", "--tasks", "nope", "--quiet"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_on_the_samples(default_gguf_path):
    from llama3.llama import load

    llama = load(str(default_gguf_path))
    text = evaluate(llama, "perplexity")
    assert text.metrics["bits_per_byte"] < 1.2  # 0.88 measured; a random model is near 17
    easy = evaluate(llama, "arc_easy")
    assert easy.metrics["acc"] >= 0.5  # 0.75 measured on the four sample questions


def test_results_json_is_strict_and_quiet_is_quiet(llama, tmp_path, monkeypatch, capsys):
    # through the `llama3` front end, whose parser carries the verb's function among the options
    from llama3.cli import main as llama3_main

    loaded = {}
    monkeypatch.setattr("llama3.llama.load", lambda name, **kw: loaded.update(kw) or llama)
    out = tmp_path / "results.json"
    assert llama3_main(["eval", "--model", "tiny", "--tasks", "boolq,gsm8k", "--limit", "1", "--shots", "0",
                        "--max-new-tokens", "2", "--output", str(out), "--quiet", "--quantize", "int8",
                        "--compile"]) == 0
    assert loaded["quantize"] == "int8" and loaded["compile"] is True
    text = out.read_text()
    assert "<function" not in text and " at 0x" not in text

    def no_nan(constant):
        raise ValueError(f"{constant} is not JSON")

    data = json.loads(text, parse_constant=no_nan)
    assert data["config"]["tasks"] == "boolq,gsm8k" and data["config"]["output"] == str(out)
    assert data["results"]["tiny"]["boolq"]["metrics"]["acc_stderr"] is None  # one item: no standard error
    shown, err = capsys.readouterr()
    assert "boolq" in shown and "gsm8k" in shown and err == ""  # the table only
