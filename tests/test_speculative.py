"""Speculative decoding: greedy output identical to plain decoding; the sampling rule keeps the target's distribution."""

import pytest
import torch

from llama3.generate import SamplingParams, generate_tokens
from llama3.quantize import quantize_model
from llama3.speculative import SpeculativeDecoder, accept_drafts

from conftest import random_model, tiny_args


pytestmark = pytest.mark.usefixtures("one_thread")


def plain_greedy(model, prompt, n, stop_ids=()):
    return [step[0] for step in generate_tokens(model, [prompt], max_new_tokens=n, stop_ids=stop_ids)]


@pytest.mark.parametrize("draft_kind", ["same", "quantized", "unrelated"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_identical_to_plain_decoding(draft_kind, k):
    target = random_model(tiny_args())
    draft = {"same": target, "quantized": quantize_model(target, "int4"),
             "unrelated": random_model(tiny_args(), seed=1)}[draft_kind]
    decoder = SpeculativeDecoder(target, draft, k=k)
    for prompt in ([1, 2, 3], [7] * 11, [42]):
        assert list(decoder.generate(prompt, max_new_tokens=23)) == plain_greedy(target, prompt, 23)
    rate = decoder.accepted / decoder.proposed
    if draft_kind == "same":
        assert rate == 1.0
    elif draft_kind == "unrelated":
        assert rate < 0.5


def test_stops_at_a_stop_token_and_at_max_new_tokens():
    target, draft = random_model(tiny_args()), random_model(tiny_args(), seed=1)
    reference = plain_greedy(target, [5, 6], 30)
    stop = reference[9]
    out = list(SpeculativeDecoder(target, draft, k=4).generate([5, 6], max_new_tokens=30, stop_ids=[stop]))
    assert out == reference[: reference.index(stop) + 1]
    assert len(list(SpeculativeDecoder(target, target, k=4).generate([5, 6], max_new_tokens=7))) == 7


def test_sampling_is_reproducible_with_a_seed():
    target, draft = random_model(tiny_args()), random_model(tiny_args(), seed=1)
    decoder = SpeculativeDecoder(target, draft, k=3)
    params = SamplingParams(temperature=0.8, top_k=20, seed=3)
    a = list(decoder.generate([1, 2, 3], max_new_tokens=20, params=params))
    b = list(decoder.generate([1, 2, 3], max_new_tokens=20, params=params))
    assert a == b and len(a) == 20


def test_rejection_rule_keeps_the_target_distribution():
    # Over many draws, the first settled token is distributed as the target's p, whatever the draft's q.
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        drafted = [int(torch.multinomial(q[0], 1, generator=g))]
        counts[accept_drafts(p, q, drafted, g)[0]] += 1
    assert (counts / n - p[0]).abs().max() < 0.015


def test_draft_must_share_the_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(random_model(tiny_args()), random_model(tiny_args(vocab_size=256)))


@pytest.mark.slow  # compiles both steps
def test_compiled_steps_with_a_quantized_draft_give_plain_greedy_output():
    # The compiled bf16 draft reads the fp32 target's shared cache through the compiled attention.
    target = random_model(tiny_args())
    decoder = SpeculativeDecoder(target, quantize_model(target, "int4"), k=3, compile=True)
    assert decoder.shares_cache()
    for prompt in ([1, 2, 3], [7] * 11):
        assert list(decoder.generate(prompt, max_new_tokens=19)) == plain_greedy(target, prompt, 19)
    assert decoder.accepted > 0
