import pytest
import torch

from llama3.eval.scoring import Request, Scorer, encode_pair, rolling_requests
from test_eval_helpers import ByteTokenizer, tiny_llama


def by_hand(model, request: Request) -> tuple[float, bool]:
    """Sum of log-softmax over the continuation, from one plain forward pass of the whole sequence."""
    tokens = torch.tensor([request.context + request.continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens)[0].double(), dim=-1)
    total, greedy = 0.0, True
    for j, token in enumerate(request.continuation):
        row = logprobs[len(request.context) + j - 1]
        total += float(row[token])
        greedy &= int(row.argmax()) == token
    return total, greedy


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def make_requests(tok) -> list[Request]:
    shots = "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\n"
    pairs = [(shots + "Q: 3+3?\nA:", f" {x}") for x in ("6", "5", "seven", "66")]
    pairs += [(shots + "Q: 1+4?\nA:", f" {x}") for x in ("5", "3")]
    pairs += [("Short", " context"), ("Other text entirely", " here and there"), ("x", "y")]
    return [encode_pair(tok, c, x) for c, x in pairs]


def test_loglikelihood_equals_log_softmax_by_hand(llama):
    requests = make_requests(llama.tokenizer)
    scores = Scorer(llama.model, vocab_size=llama.args.vocab_size, batch_size=4).loglikelihood(requests)
    for request, score in zip(requests, scores):
        expected, greedy = by_hand(llama.model, request)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.is_greedy == greedy


def test_batched_equals_unbatched_and_cacheless(llama):
    requests = make_requests(llama.tokenizer)
    one = Scorer(llama.model, vocab_size=512, batch_size=1).loglikelihood(requests)
    many = Scorer(llama.model, vocab_size=512, batch_size=16).loglikelihood(requests)
    # a plain callable has no KV cache: rows run whole
    plain = Scorer(lambda tokens: llama.model(tokens), vocab_size=512, batch_size=3).loglikelihood(requests)
    # a tiny logits budget forces one row per forward pass
    tight = Scorer(llama.model, vocab_size=512, batch_size=16, logits_budget=512).loglikelihood(requests)
    for a, b, c, d in zip(one, many, plain, tight):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.logprob == pytest.approx(c.logprob, abs=1e-4)
        assert a.logprob == pytest.approx(d.logprob, abs=1e-4)
        assert a.is_greedy == b.is_greedy == c.is_greedy


def test_greedy_continuation_is_reported(llama):
    context = tuple(llama.tokenizer.encode("The cat", bos=True))
    greedy = []
    tokens = list(context)
    for _ in range(3):
        with torch.no_grad():
            nxt = int(llama.model(torch.tensor([tokens]))[0, -1].argmax())
        greedy.append(nxt)
        tokens.append(nxt)
    other = greedy[:2] + [(greedy[2] + 1) % 256]
    scores = Scorer(llama.model, vocab_size=512).loglikelihood([Request(context, tuple(greedy)), Request(context, tuple(other))])
    assert scores[0].is_greedy and not scores[1].is_greedy
    assert scores[0].logprob > scores[1].logprob


def test_long_context_is_cut_from_the_left(llama):
    tok = llama.tokenizer
    long_context = tuple(tok.encode("abc " * 200, bos=True))  # 801 tokens > max_seq_len 256
    request = Request(long_context, tuple(tok.encode(" end")))
    score = Scorer(llama.model, vocab_size=512).loglikelihood([request])[0]
    kept = Request(long_context[-(256 - 4):], request.continuation)
    assert score.logprob == pytest.approx(by_hand(llama.model, kept)[0], abs=1e-4)


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = ByteTokenizer()
    r = encode_pair(tok, "Answer: ", "yes")
    assert r.context == tuple(tok.encode("Answer:", bos=True))
    assert r.continuation == tuple(tok.encode(" yes"))


def test_rolling_requests_score_every_token_once_within_the_window():
    tokens = list(range(10, 47))
    requests = rolling_requests(tokens, prefix=[1], window=8, stride=3)
    scored = [t for r in requests for t in r.continuation]
    assert scored == tokens
    for r in requests:
        assert len(r.context) + len(r.continuation) <= 8
        whole = [1] + tokens
        start = whole.index(r.continuation[0])
        assert list(r.context) == whole[max(0, start - len(r.context)) : start]  # the tokens just before
    without_prefix = rolling_requests(tokens, prefix=[], window=8, stride=3)
    assert [t for r in without_prefix for t in r.continuation] == tokens[1:]


class CountingModel(torch.nn.Module):
    """Delegates to a model and records the shape of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.args, self.calls = model, model.args, []

    def forward(self, tokens, positions=None, cache=None, logits_index=None):
        self.calls.append((tuple(tokens.shape), logits_index is not None))
        return self.inner(tokens, positions, cache, logits_index=logits_index)


def test_shared_context_runs_once_and_letter_choices_share_a_row(llama):
    tok = llama.tokenizer
    shots = "Question: which letter comes first?\nA. b\nB. a\nAnswer: B\n\n" * 3
    requests = [encode_pair(tok, shots + f"Question: pick {q}\nAnswer:", letter) for q in "xyz" for letter in "ABCD"]
    counting = CountingModel(llama.model)
    scores = Scorer(counting, vocab_size=512, batch_size=8).loglikelihood(requests)
    # 12 requests, but 3 rows (one per question): the shared k-shot prefix once, the rest of each question,
    # then one scored position per row
    assert counting.calls[0][0] == (1, len(tok.encode(shots, bos=True)) + len("Question: pick "))
    assert counting.calls[-1] == ((3, 1), False)
    assert len(counting.calls) == 3
    for request, score in zip(requests, scores):
        assert score.logprob == pytest.approx(by_hand(llama.model, request)[0], abs=1e-4)
