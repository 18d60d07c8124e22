"""The cost of constrained decoding: decode tokens/s of the serving engine with and without a JSON-schema
constraint (llguidance computing each request's token mask every step), at 1 and 8 streams, and the time to
compile a schema into a grammar and its matcher.

    python benchmarks/bench_constrained.py --threads 1

Each stream decodes --max-tokens tokens; the constrained runs' schema (an array of at least 60 digits) cannot end
before that, so both modes do the same number of steps. The modes alternate --rounds times and the best round of
each is reported, with the ratio. On a machine shared with other jobs the ratio wanders with the load, so the
constrained runs also time the grammar's own work (computing and applying each mask, advancing the grammar) and
report it as a share of their decode time: that share is what the constraint costs, whatever the load.
"""

from __future__ import annotations

import argparse
import time

import torch

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 60}
COMPILE_SCHEMAS = {
    "small object": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                     "required": ["name", "age"]},
    "nested, enums, bounds": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1},
                                                  "role": {"enum": ["admin", "user", "guest"]}},
                 "required": ["id", "role"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 5},
        "score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["user", "tags"]},
}


GRAMMAR_SECONDS = [0.0]  # time inside Constraint.mask_ / accept


def time_grammar_work() -> None:
    from llama3.constrain import Constraint
    for name in ("mask_", "accept"):
        method = getattr(Constraint, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                GRAMMAR_SECONDS[0] += time.perf_counter() - start
        setattr(Constraint, name, timed)


def decode_rate(llm, streams: int, max_tokens: int, constrained: bool) -> tuple[float, float]:
    """(tokens/s, the grammar's share of the decode time)."""
    from llama3.constrain import Constraint, json_schema_grammar
    from llama3.generate import SamplingParams
    from llama3.serve.engine import Engine, Request
    engine = Engine(llm.model, llm.tokenizer, max_batch=streams, max_context=512)
    grammar = json_schema_grammar(SCHEMA)
    prompt = llm.encode_chat([{"role": "user", "content": "Write sixty digits as a JSON array."}])
    done = []
    requests = [Request(prompt, max_tokens=max_tokens, emit=lambda out: done.append(out) if out.finish_reason else None,
                        params=SamplingParams(), ignore_eos=not constrained,
                        constraint=Constraint(llm.tokenizer, grammar) if constrained else None)
                for _ in range(streams)]
    engine.submit(requests)
    while engine.num_running < streams:  # prefill outside the timing
        engine.step()
    start, tokens = time.perf_counter(), sum(r.completion_tokens for r in requests)
    GRAMMAR_SECONDS[0] = 0.0
    while len(done) < streams:
        engine.step()
    elapsed = time.perf_counter() - start
    assert all(out.finish_reason == "length" for out in done), [out.finish_reason for out in done]
    return (sum(r.completion_tokens for r in requests) - tokens) / elapsed, GRAMMAR_SECONDS[0] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import llama3
    from llama3.constrain import Constraint, json_schema_grammar, ll_tokenizer
    from llama3.hub import DEFAULT_MODEL
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}")
    llm = llama3.load(args.model or DEFAULT_MODEL, prepack=True)
    start = time.perf_counter()
    ll_tokenizer(llm.tokenizer)
    print(f"llguidance tokenizer ({llm.tokenizer.vocab_size} tokens, once per process): "
          f"{(time.perf_counter() - start) * 1e3:.0f} ms")
    for name, schema in COMPILE_SCHEMAS.items():
        start = time.perf_counter()
        Constraint(llm.tokenizer, json_schema_grammar(schema)).mask_(torch.zeros(llm.tokenizer.vocab_size))
        print(f"compile '{name}' schema + first mask: {(time.perf_counter() - start) * 1e3:.1f} ms")
    time_grammar_work()
    print("\n| streams | free tok/s | JSON-schema tok/s | constrained / free | grammar's share of decode time |\n"
          "|---|---|---|---|---|")
    for streams in (1, 8):
        best, share = {False: 0.0, True: 0.0}, []
        for _ in range(args.rounds):
            for constrained in (False, True):
                rate, grammar_share = decode_rate(llm, streams, args.max_tokens, constrained)
                best[constrained] = max(best[constrained], rate)
                share += [grammar_share] if constrained else []
        print(f"| {streams} | {best[False]:.1f} | {best[True]:.1f} | {best[True] / best[False]:.2f} | "
              f"{100 * min(share):.1f}% |", flush=True)


if __name__ == "__main__":
    main()
