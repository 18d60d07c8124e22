"""What quantization costs in quality: perplexity of the same model as fp32, bf16, int8 and int4 on a held text.

    python benchmarks/bench_quality.py [--model smollm2-135m-instruct] [--tokens 4096]

The text is CPython's license (lib/pythonX.Y/LICENSE.txt of the running interpreter): plain English prose that is
part of every Python install, so the figures can be reproduced anywhere. It is scored in windows of --window
tokens, each token predicted from the ones before it in its window.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama3.hub import DEFAULT_MODEL  # noqa: E402
from llama3.llama import load  # noqa: E402

VARIANTS = {  # name: load() keyword arguments
    "fp32": dict(),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(quantize="int8"),
    "int4 (group 32)": dict(quantize="int4", group_size=32),
    "int4 (group 64)": dict(quantize="int4", group_size=64),
}


def held_text() -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window + 1]])
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1])
        nll += F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=4096, help="score at most this many tokens of the text")
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args()
    ids = None
    rows = []
    for name, kwargs in VARIANTS.items():
        start = time.perf_counter()
        llm = load(args.model, **kwargs)
        if ids is None:
            ids = llm.tokenizer.encode(held_text())[: args.tokens]
        ppl = perplexity(llm.model, ids, args.window)
        rows.append((name, ppl))
        print(f"{name:16} perplexity {ppl:7.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
        del llm
    base = rows[0][1]
    print(f"\n{args.model}, {len(ids)} tokens of CPython's LICENSE.txt, windows of {args.window}:")
    for name, ppl in rows:
        print(f"  {name:16} {ppl:7.3f}  {100 * (ppl / base - 1):+6.2f}% vs fp32")


if __name__ == "__main__":
    main()
