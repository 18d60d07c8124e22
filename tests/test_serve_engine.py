"""The continuous-batching engine on a tiny random model: batching changes no result, requests join and leave
freely, prompts are prefilled in chunks, cancellation frees slots, the queue is bounded."""

from __future__ import annotations

import threading

import pytest
import torch

from llama3.generate import SamplingParams, generate_tokens
from llama3.llama import Llama
from llama3.serve.engine import Engine, Output, QueueFull, Request

from conftest import random_model, tiny_args


class CharTokenizer:
    """One character per token id over a small alphabet, with Llama-style special ids; enough to serve a random
    model (real tokenizers are tested with the default model)."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?\n"
    bos_id, pad_id, eos_id = 509, 510, 511
    stop_ids = frozenset({511})
    vocab_size = 512

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, **_) -> list[int]:
        ids = [self.ALPHABET.index(c) if c in self.ALPHABET else 0 for c in text]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return "".join(self.ALPHABET[i % len(self.ALPHABET)] for i in ids if i < self.bos_id)


class PlainChatFormat:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_dialog_prompt(self, messages: list[dict]) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.tokenizer.encode(text, bos=True)


def tiny_llama(seed: int = 0) -> Llama:
    tokenizer = CharTokenizer()
    return Llama(random_model(tiny_args(), seed=seed), tokenizer, PlainChatFormat(tokenizer), name="tiny")


class Recorder:
    """Collects one request's outputs (the engine calls `emit` on its own thread)."""

    def __init__(self):
        self.outputs: list[Output] = []
        self.done = threading.Event()

    def __call__(self, out: Output) -> None:
        self.outputs.append(out)
        if out.finish_reason:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def final(self) -> Output:
        return self.outputs[-1]


def make_request(prompt, max_tokens=12, **kwargs) -> tuple[Request, Recorder]:
    rec = Recorder()
    return Request(prompt, max_tokens=max_tokens, emit=rec, **kwargs), rec


def run_until_done(engine: Engine, recorders: list[Recorder], max_steps: int = 1000) -> None:
    """Drive the engine on this thread, one step at a time (no engine thread: fully deterministic)."""
    for _ in range(max_steps):
        if all(r.done.is_set() for r in recorders):
            return
        engine.step()
    raise AssertionError("requests did not finish")


def prompts(llm, n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[llm.tokenizer.bos_id] + torch.randint(0, 32, (int(torch.randint(3, 40, (1,), generator=g)),),
                                                   generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def llm():
    return tiny_llama()


def reference(llm, prompt, max_tokens, **kwargs) -> str:
    """The core library's generation of one prompt alone."""
    return llm.complete_ids([prompt], max_new_tokens=max_tokens, **kwargs)[0]


def test_batched_decoding_equals_one_request_at_a_time(llm):
    # 7 requests through 3 slots with different lengths: they join and leave mid-flight, and finishing requests
    # have the last running cache row moved into their place.
    engine = Engine(llm.model, llm.tokenizer, max_batch=3, prefill_chunk=16)
    ps = prompts(llm, 7)
    budgets = [5, 20, 9, 14, 3, 17, 11]
    reqs = [make_request(p, m) for p, m in zip(ps, budgets)]
    engine.submit([r for r, _ in reqs])
    run_until_done(engine, [rec for _, rec in reqs])
    for p, m, (req, rec) in zip(ps, budgets, reqs):
        assert rec.text == reference(llm, p, m)
        assert rec.final.finish_reason in ("length", "stop")
        assert rec.final.prompt_tokens == len(p) and 1 <= rec.final.completion_tokens <= m
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_seeded_sampling_is_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    p = prompts(llm, 1, seed=5)[0]
    alone = Engine(llm.model, llm.tokenizer, max_batch=1)
    req, rec = make_request(p, 16, params=params)
    alone.submit([req])
    run_until_done(alone, [rec])
    batched = Engine(llm.model, llm.tokenizer, max_batch=4)
    others = [make_request(q, 16, params=SamplingParams(temperature=1.0, seed=i))
              for i, q in enumerate(prompts(llm, 3))]
    again = make_request(p, 16, params=params)
    batched.submit([others[0][0], others[1][0], again[0], others[2][0]])
    run_until_done(batched, [r for _, r in others] + [again[1]])
    assert again[1].text == rec.text == reference(llm, p, 16, temperature=1.0, top_p=0.9, seed=1234)


def test_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=2, prefill_chunk=8)
    short, rec_short = make_request([llm.tokenizer.bos_id, 1, 2, 3], max_tokens=40)
    engine.submit([short])
    engine.step()  # prefill (one chunk) -> first token
    assert len(rec_short.outputs) == 1
    long_prompt = [llm.tokenizer.bos_id] + [i % 30 for i in range(60)]  # 61 tokens: 8 chunks of 8
    long, rec_long = make_request(long_prompt, max_tokens=5)
    engine.submit([long])
    for step in range(8):
        engine.step()
        assert len(rec_short.outputs) == 2 + step  # one token per step for the running request, no stall
        assert (len(rec_long.outputs) > 0) == (step == 7)  # the long one's first token comes with its last chunk
    run_until_done(engine, [rec_short, rec_long])
    assert rec_long.text == reference(llm, long_prompt, 5)
    assert rec_short.text == reference(llm, short.prompt, 40)


def test_short_prompts_arriving_together_share_one_prefill_pass(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=8, prefill_chunk=64)
    calls = []
    model = engine.model
    engine.model = lambda tokens, *args, **kwargs: calls.append(tuple(tokens.shape)) or model(tokens, *args, **kwargs)
    ps = [[llm.tokenizer.bos_id] + [(7 * i + j) % 30 for j in range(11)] for i in range(6)]  # 12 tokens each:
    # 5 of them fit in a 64-token budget, the sixth waits for the next step
    reqs = [make_request(p, 6) for p in ps]
    engine.submit([r for r, _ in reqs])
    engine.step()
    assert len(calls) == 1 and calls[0][0] == 5 and engine.num_running == 5 and engine.num_waiting == 1
    assert all(len(rec.outputs) == 1 for _, rec in reqs[:5])  # each has its first token already
    engine.step()  # decodes the five, then prefills the sixth
    assert calls[1:] == [(5, 1), (1, len(ps[5]))]
    run_until_done(engine, [rec for _, rec in reqs])
    for p, (_, rec) in zip(ps, reqs):
        assert rec.text == reference(llm, p, 6)


def test_cancel_frees_the_slot_and_the_others_are_unaffected(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=2)
    ps = prompts(llm, 3, seed=2)
    reqs = [make_request(p, 30) for p in ps]
    engine.submit([r for r, _ in reqs])
    for _ in range(4):
        engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    reqs[0][0].cancel()  # row 0: the request in row 1 moves into its place
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 0  # the third took the freed slot at once
    run_until_done(engine, [reqs[1][1], reqs[2][1]])
    assert not reqs[0][1].done.is_set()  # a cancelled request gets no further outputs
    assert reqs[1][1].text == reference(llm, ps[1], 30)
    assert reqs[2][1].text == reference(llm, ps[2], 30)


def test_cancelled_while_waiting_never_runs(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=1)
    (a, rec_a), (b, rec_b) = make_request(prompts(llm, 1)[0], 3), make_request(prompts(llm, 1)[0], 3)
    engine.submit([a, b])
    b.cancel()
    run_until_done(engine, [rec_a])
    engine.step()
    assert rec_b.outputs == [] and engine.num_waiting == 0 and engine.num_running == 0


def test_stop_string_ends_the_request(llm):
    p = prompts(llm, 1, seed=3)[0]
    full = reference(llm, p, 30)
    stop = full[10:12]
    engine = Engine(llm.model, llm.tokenizer, max_batch=2)
    req, rec = make_request(p, 30, stop=[stop])
    engine.submit([req])
    run_until_done(engine, [rec])
    assert rec.text == full[:full.index(stop)]
    assert rec.final.finish_reason == "stop"
    assert rec.final.completion_tokens == full.index(stop) + len(stop)  # one character per token


def test_end_of_turn_token_stops_unless_ignored(llm):
    p = prompts(llm, 1, seed=4)[0]
    ids = [step[0] for step in generate_tokens(llm.model, [p], max_new_tokens=6)]
    assert ids[3] not in ids[:3], "the test needs the 4th token to be new"
    tokenizer = CharTokenizer()
    tokenizer.stop_ids = frozenset({ids[3]})  # the 4th generated token now ends the turn
    engine = Engine(llm.model, tokenizer, max_batch=1)
    stopped, rec_stopped = make_request(p, 6)
    ignoring, rec_ignoring = make_request(p, 6, ignore_eos=True)
    engine.submit([stopped, ignoring])
    run_until_done(engine, [rec_stopped, rec_ignoring])
    full = tokenizer.decode(ids)
    assert (rec_stopped.text, rec_stopped.final.finish_reason, rec_stopped.final.completion_tokens) == \
        (full[:3], "stop", 4)
    assert (rec_ignoring.text, rec_ignoring.final.finish_reason) == (full, "length")


def test_queue_is_bounded_and_submission_is_all_or_nothing(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=2, max_queue=1)
    ps = prompts(llm, 4)
    engine.submit([make_request(ps[0])[0], make_request(ps[1])[0]])  # the free slots
    with pytest.raises(QueueFull):
        engine.submit([make_request(ps[2])[0], make_request(ps[3])[0]])
    assert engine.num_waiting == 2
    engine.submit([make_request(ps[2])[0]])  # the one waiting place
    with pytest.raises(QueueFull):
        engine.submit([make_request(ps[3])[0]])


def test_max_tokens_is_clamped_to_the_context(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=1, max_context=20)
    p = prompts(llm, 1)[0][:15]
    req, rec = make_request(p, 100, ignore_eos=True)
    engine.submit([req])
    run_until_done(engine, [rec])
    assert (rec.final.finish_reason, rec.final.completion_tokens) == ("length", 5)
    with pytest.raises(ValueError, match="context"):
        engine.submit([make_request(list(range(20)))[0]])


def test_a_failing_forward_pass_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch):
    engine = Engine(llm.model, llm.tokenizer, max_batch=2).start()
    try:
        broken, rec_broken = make_request(prompts(llm, 1)[0], 5)
        with monkeypatch.context() as m:
            m.setattr(engine, "model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
            engine.submit([broken])
            assert rec_broken.done.wait(30)
        assert rec_broken.final.finish_reason == "error" and "out of memory" in rec_broken.final.error
        p = prompts(llm, 1)[0]
        ok, rec_ok = make_request(p, 5)
        engine.submit([ok])
        assert rec_ok.done.wait(30)
        assert rec_ok.text == reference(llm, p, 5)
    finally:
        engine.stop()
    assert not engine.alive


@pytest.mark.parametrize("settings", [dict(max_batch=0), dict(max_queue=-1), dict(prefill_chunk=0),
                                      dict(max_context=0)])
def test_bad_engine_settings_are_refused(llm, settings):
    with pytest.raises(ValueError, match="need max_batch"):
        Engine(llm.model, llm.tokenizer, **settings)


# ---- the paged KV cache: memory held by tokens, prefixes shared, preemption ----------------------------------------

def assert_all_blocks_returned(engine: Engine) -> None:
    pool = engine.pool
    assert pool.num_used == 0 and not any(pool.refs)


def test_a_second_turn_reuses_the_first_turns_blocks(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=4, prefill_chunk=16, block_size=4)
    first_prompt = prompts(llm, 1, seed=6)[0] + list(range(20))
    first, rec_first = make_request(first_prompt, 9, ignore_eos=True)
    engine.submit([first])
    run_until_done(engine, [rec_first])
    assert engine.metrics.prefix_cache_hits.value() == 0
    # The next turn: the whole first exchange (prompt and reply) and a new message.
    second_prompt = first.tokens + [5, 6, 7, 8, 9]
    second, rec_second = make_request(second_prompt, 10)
    engine.submit([second])
    run_until_done(engine, [rec_second])
    assert rec_second.text == reference(llm, second_prompt, 10)
    hits = engine.metrics.prefix_cache_hits.value()
    assert hits == (len(first.tokens) - 1) // 4 * 4  # every full block of the first turn, its reply included
    assert_all_blocks_returned(engine)


def test_running_requests_share_a_common_prefix(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=4, prefill_chunk=64, block_size=4)
    system = [llm.tokenizer.bos_id] + [(3 * i) % 30 for i in range(23)]  # 24 tokens: 6 full blocks
    a, rec_a = make_request(system + [1, 2, 3], 20)
    engine.submit([a])
    engine.step()
    engine.step()
    b, rec_b = make_request(system + [4, 5], 20)
    engine.submit([b])
    engine.step()
    assert a.blocks[:6] == b.blocks[:6] and all(engine.pool.refs[blk] == 2 for blk in a.blocks[:6])
    run_until_done(engine, [rec_a, rec_b])
    assert rec_a.text == reference(llm, a.prompt, 20) and rec_b.text == reference(llm, b.prompt, 20)
    assert_all_blocks_returned(engine)
    # Without prefix caching the same answers, computed in full.
    plain = Engine(llm.model, llm.tokenizer, max_batch=4, prefill_chunk=64, block_size=4, prefix_caching=False)
    c, rec_c = make_request(system + [4, 5], 20)
    plain.submit([c])
    run_until_done(plain, [rec_c])
    assert rec_c.text == rec_b.text and plain.metrics.prefix_cache_hits.value() == 0


def test_memory_runs_out_mid_generation_preempts_and_recomputes(llm):
    # Room for one full context (64 positions) while four requests want ~45 each: some are set back and
    # recomputed, and every answer is still the one-at-a-time answer.
    engine = Engine(llm.model, llm.tokenizer, max_batch=4, max_context=64, kv_cache_tokens=64, block_size=4,
                    prefill_chunk=64)
    ps = prompts(llm, 4, seed=7)
    reqs = [make_request(p[:15], 30, ignore_eos=True) for p in ps]
    engine.submit([r for r, _ in reqs])
    run_until_done(engine, [rec for _, rec in reqs])
    assert engine.metrics.preemptions.value() > 0
    for (req, rec) in reqs:
        assert rec.text == reference(llm, req.prompt, 30)
        assert rec.final.completion_tokens == 30
    assert_all_blocks_returned(engine)


def test_blocks_are_returned_when_requests_end_or_are_cancelled(llm):
    engine = Engine(llm.model, llm.tokenizer, max_batch=2, prefill_chunk=8, block_size=4)
    long_prompt = [llm.tokenizer.bos_id] + [i % 30 for i in range(40)]
    running, _ = make_request([llm.tokenizer.bos_id, 1, 2, 3], 50)
    prefilling, _ = make_request(long_prompt, 50)  # cancelled half-way through its chunked prefill
    engine.submit([running, prefilling])
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used > 0 and engine.num_running == 1 and engine.num_waiting == 1
    running.cancel()
    prefilling.cancel()
    engine.step()
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert_all_blocks_returned(engine)
