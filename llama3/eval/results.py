"""What an evaluation returns, and how it is shown: a text table, JSON, and a PNG bar chart comparing models."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # e.g. acc, acc_norm, exact_match, pass@1, bits_per_byte
    n: int  # items scored
    shots: int
    seconds: float
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # per subject / domain
    samples: list[dict] = field(default_factory=list)  # per item: prediction, target, correct

    @property
    def main_metric(self) -> str:
        for name in ("acc", "exact_match", "pass@1", "bits_per_byte"):
            if name in self.metrics:
                return name
        return next(iter(self.metrics))


def accuracy_metrics(correct: list[bool], name: str = "acc") -> dict[str, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval reports)."""
    n = len(correct)
    mean = sum(correct) / n if n else float("nan")
    stderr = math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else float("nan")
    return {name: mean, f"{name}_stderr": stderr}


def format_table(results_by_model: dict[str, list[TaskResult]]) -> str:
    """One line per model and task with every metric (standard errors as ±), then per-subject lines."""
    lines = [f"{'model':<28} {'task':<18} {'n':>5} {'shots':>5}  metrics", "-" * 100]
    for model, results in results_by_model.items():
        for r in results:
            shown = []
            for name, value in r.metrics.items():
                if name.endswith("_stderr"):
                    continue
                err = r.metrics.get(f"{name}_stderr")
                shown.append(f"{name}={_number(value)}" + (f" ±{err:.4f}" if err is not None and not math.isnan(err) else ""))
            lines.append(f"{_cut(model, 28):<28} {r.task:<18} {r.n:>5} {r.shots:>5}  {'  '.join(shown)}")
            for subject, metrics in sorted(r.breakdown.items()):
                values = "  ".join(f"{k}={_number(v)}" for k, v in metrics.items() if k != "n")
                lines.append(f"{'':<28} {'  ' + _cut(subject, 16):<18} {int(metrics.get('n', 0)):>5} {'':>5}  {values}")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def to_json(results_by_model: dict[str, list[TaskResult]], config: dict, include_samples: bool = False) -> str:
    """Strict JSON: NaN (the standard error of one item) becomes null, paths become strings; anything else that
    JSON cannot hold (a function, an object) is an error rather than its repr."""
    models = {}
    for model, results in results_by_model.items():
        models[model] = {}
        for r in results:
            entry = asdict(r)
            if not include_samples:
                entry.pop("samples")
            models[model][r.task] = entry
    return json.dumps(_finite({"config": config, "results": models}), indent=2, allow_nan=False,
                      default=lambda v: str(v) if isinstance(v, Path) else _not_json(v))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _not_json(value):
    raise TypeError(f"{type(value).__name__} has no JSON form: {value!r}")


def plot_comparison(results_by_model: dict[str, list[TaskResult]], path: str | Path) -> None:
    """A grouped bar chart: one group per task (its main metric), one bar per model. Drawn with Pillow, which
    the tokenizer package already brings, so charts need no plotting library."""
    from PIL import Image, ImageDraw, ImageFont

    tasks = list(dict.fromkeys(r.task for results in results_by_model.values() for r in results))
    value = {(m, r.task): (r.main_metric, r.metrics[r.main_metric]) for m, rs in results_by_model.items() for r in rs}
    models = list(results_by_model)
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
    bar, gap, left, top, bottom, height = 28, 30, 70, 60, 110, 360
    group = bar * len(models) + gap
    width = left + group * max(1, len(tasks)) + 40 + 220
    image = Image.new("RGB", (width, top + height + bottom), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    # every main metric except bits per byte is a fraction in [0, 1]; bits per byte get their own scale
    scale = max([1.0] + [v for (_, v) in value.values() if not math.isnan(v)])
    draw.text((left, 15), "llama3 eval: main metric per task", fill="black", font=font)
    for i in range(6):
        y = top + height - height * i / 5
        draw.line([(left - 5, y), (left + group * len(tasks), y)], fill="#DDDDDD")
        draw.text((5, y - 6), f"{scale * i / 5:.2f}", fill="black", font=font)
    for t, task in enumerate(tasks):
        x0 = left + t * group + gap // 2
        for m, model in enumerate(models):
            if (model, task) not in value:
                continue
            metric, v = value[(model, task)]
            if math.isnan(v):
                continue
            h = height * v / scale
            x = x0 + m * bar
            draw.rectangle([x, top + height - h, x + bar - 4, top + height], fill=colors[m % len(colors)])
            draw.text((x, top + height - h - 14), f"{v:.2f}", fill="black", font=font)
        metric = next(value[(m, task)][0] for m in models if (m, task) in value)
        draw.text((x0, top + height + 8), task, fill="black", font=font)
        draw.text((x0, top + height + 24), metric, fill="#555555", font=font)
    legend_x = left + group * len(tasks) + 40
    for m, model in enumerate(models):
        y = top + 20 * m
        draw.rectangle([legend_x, y, legend_x + 12, y + 12], fill=colors[m % len(colors)])
        draw.text((legend_x + 18, y), _cut(model, 30), fill="black", font=font)
    image.save(path)
