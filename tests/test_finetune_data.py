"""Fine-tuning data: record formats, label masking (exact ids), malformed records, packing and batching."""

import io
import json

import pytest

from llama3.finetune.data import (
    IGNORE,
    Batches,
    DataError,
    Example,
    collate,
    fixed_batches,
    load_preferences,
    load_sft,
    pack,
    record_to_messages,
    record_to_preference,
    render_spans,
    split_validation,
    tokenize_conversation,
)
from llama3.finetune.samples import SAMPLES

X = IGNORE


@pytest.fixture(scope="module")
def llama_format():
    from llama3.tokenizer import ChatFormat, Tokenizer
    return ChatFormat(Tokenizer())


@pytest.fixture(scope="module")
def chatml_format(default_gguf_path):
    """The default model's own chat format: its GGUF's BPE tokenizer and ChatML template."""
    from llama3.tokenizer import BPETokenizer, chat_format_for
    return chat_format_for(BPETokenizer.from_gguf(default_gguf_path))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


# ---- formats -------------------------------------------------------------------------------------------------------

def test_every_format_becomes_the_same_messages():
    assert record_to_messages({"messages": HI}) == HI
    assert record_to_messages({"conversations": [{"from": "human", "value": "Hi"},
                                                 {"from": "gpt", "value": "Hello"}]}) == HI
    assert record_to_messages({"instruction": "Hi", "output": "Hello"}) == HI
    assert record_to_messages({"instruction": "Hi", "input": "", "output": "Hello"}) == HI
    assert record_to_messages({"prompt": "Hi", "completion": "Hello"}) == HI
    assert record_to_messages({"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief"}) \
        == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Translate\n\nchat"},
            {"role": "assistant", "content": "cat"}]
    assert record_to_preference({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}) == (
        [HI[0]], [HI[1]], [{"role": "assistant", "content": "Go away"}])


@pytest.mark.parametrize("record, problem", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}, "no assistant"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker 'alien'"),
    ({"instruction": "Hi"}, "field 'output' must be a string"),
    ({"text": "free text"}, "unknown record format"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b"}, "--dpo"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_records_say_what_is_wrong(record, problem):
    with pytest.raises(DataError, match=problem):
        record_to_messages(record)


@pytest.mark.parametrize("record, problem", [
    ({"prompt": "Hi", "chosen": "a"}, "missing rejected"),
    ({"prompt": "Hi", "chosen": "same", "rejected": "same"}, "the same text"),
    ({"prompt": "Hi", "chosen": "", "rejected": "b"}, "chosen must be one non-empty assistant reply"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen must be one"),
])
def test_malformed_preference_pairs(record, problem):
    with pytest.raises(DataError, match=problem):
        record_to_preference(record)


# ---- label masking: exact ids --------------------------------------------------------------------------------------

def test_llama3_labels_cover_the_reply_and_its_end_of_turn(llama_format):
    # <|begin_of_text|> <|start_header_id|> user <|end_header_id|> \n\n Hi <|eot_id|>
    # <|start_header_id|> assistant <|end_header_id|> \n\n Hello <|eot_id|>
    tokens, labels = tokenize_conversation(llama_format, HI)
    assert tokens == [128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271, 9906, 128009]
    assert labels == [X, X, X, X, X, X, X, X, X, X, X, 9906, 128009]


TWO_TURNS = [{"role": "system", "content": "Be brief"}, HI[0], HI[1],
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]


@pytest.mark.parametrize("strategy", ["assistant", "last", "all"])
def test_llama3_label_strategies(llama_format, strategy):
    system = [128006, 9125, 128007, 271, 3513, 10015, 128009]  # header "system", "Be brief", <|eot_id|>
    user1 = [128006, 882, 128007, 271, 13347, 128009]
    head = [128006, 78191, 128007, 271]
    reply1 = [9906, 128009]
    user2 = [128006, 882, 128007, 271, 1383, 68, 128009]  # "Bye"
    reply2 = [10031, 499, 128009]  # "See you"
    tokens, labels = tokenize_conversation(llama_format, TWO_TURNS, strategy)
    assert tokens == [128000, *system, *user1, *head, *reply1, *user2, *head, *reply2]

    def hidden(ids):
        return [X] * len(ids)
    learn1 = reply1 if strategy != "last" else hidden(reply1)
    expected = [X, *hidden(system), *hidden(user1), *hidden(head), *learn1, *hidden(user2), *hidden(head), *reply2]
    if strategy == "all":
        expected = [X, *tokens[1:]]
    assert labels == expected


@pytest.mark.parametrize("strategy", ["assistant", "last", "all"])
def test_chat_template_labels(chatml_format, strategy):
    """The default model's ChatML template: the reply and <|im_end|> are learned, the newline after it is not."""
    tok = chatml_format.tokenizer

    def enc(text):
        return tok.encode(text, allowed_special="all")
    system = enc("<|im_start|>system\nBe brief<|im_end|>\n")
    user1, user2 = enc("<|im_start|>user\nHi<|im_end|>\n"), enc("<|im_start|>user\nBye<|im_end|>\n")
    head = enc("<|im_start|>assistant\n")
    reply1, reply2 = enc("Hello<|im_end|>"), enc("See you<|im_end|>")
    newline = enc("\n")
    assert reply1[-1] == tok.special_tokens["<|im_end|>"] == 2 and len(newline) == 1
    tokens, labels = tokenize_conversation(chatml_format, TWO_TURNS, strategy)
    assert tokens == [*system, *user1, *head, *reply1, *newline, *user2, *head, *reply2, *newline]

    def hidden(ids):
        return [X] * len(ids)
    learn1 = reply1 if strategy != "last" else hidden(reply1)
    expected = [*hidden(system), *hidden(user1), *hidden(head), *learn1, X, *hidden(user2), *hidden(head), *reply2, X]
    if strategy == "all":
        expected = [X, *tokens[1:]]
    assert labels == expected


def test_template_default_system_prompt_is_context_not_label(chatml_format):
    """SmolLM's template adds its own system prompt when there is none; it is part of the prompt, never learned."""
    tokens, labels = tokenize_conversation(chatml_format, HI)
    text = chatml_format.tokenizer.decode(tokens)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    learned = [t for t in labels if t != X]
    assert chatml_format.tokenizer.decode(learned) == "Hello<|im_end|>"


@pytest.mark.parametrize("fmt", ["llama_format", "chatml_format"])
def test_training_ids_are_the_ids_seen_at_inference(fmt, request):
    """Encoding piece by piece must give exactly what encode_dialog_prompt gives for the same conversation up to
    each reply, so the model is trained on the token sequences it will be prompted with."""
    chat_format = request.getfixturevalue(fmt)
    with open(SAMPLES["pirate"]) as f:
        records = [json.loads(line) for line in f][:40]
    for record in records:
        messages = record_to_messages(record)
        spans = render_spans(chat_format, messages)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = [t for s in spans if s.message < i or (s.message == i and not s.is_body) for t in s.ids]
            assert prefix == chat_format.encode_dialog_prompt(messages[:i])


def test_special_token_text_in_a_message_is_rejected_for_templates(chatml_format):
    bad = [{"role": "user", "content": "Hi<|im_end|>"}, HI[1]]
    with pytest.raises(DataError, match="special token '<\\|im_end\\|>'"):
        tokenize_conversation(chatml_format, bad)


# ---- files ---------------------------------------------------------------------------------------------------------

def test_bad_lines_are_reported_with_their_number_and_skipped(llama_format, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI}, "{not json", {"messages": [HI[0]]}, "",
                                              {"prompt": "Hi", "completion": "Hello"}])
    log = io.StringIO()
    examples, report = load_sft(path, llama_format, max_len=64, log=log)
    assert [e.line for e in examples] == [1, 5]
    assert [line for line, _ in report.skipped] == [2, 3]
    assert f"{path}:2: skipped: not valid JSON" in log.getvalue()
    assert f"{path}:3: skipped: no assistant message" in log.getvalue()
    assert "2 of 4 records, 2 skipped" in report.summary()
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        load_sft(path, llama_format, max_len=64, on_error="raise")


def test_a_file_with_nothing_usable_is_an_error(llama_format, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="no usable records.*line 1: unknown record format"):
        load_sft(path, llama_format, max_len=64, log=None)
    with pytest.raises(DataError, match="no such data file"):
        load_sft(tmp_path / "missing.jsonl", llama_format, max_len=64)


def test_truncation_keeps_the_start_and_drops_examples_left_without_labels(llama_format, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 50}, HI[1]]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI}, long_prompt])
    examples, report = load_sft(path, llama_format, max_len=12, log=None)
    assert len(examples) == 1 and len(examples[0].tokens) == 12 and report.truncated == 2
    assert examples[0].labels[-1] == 9906  # "Hello" kept, its <|eot_id|> cut
    assert report.skipped[0][0] == 2 and "no tokens to learn within the first 12" in report.skipped[0][1]


def test_preference_pairs_share_the_prompt_and_label_only_the_reply(llama_format, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}])
    (pair,), _ = load_preferences(path, llama_format, max_len=64)
    prompt = llama_format.encode_dialog_prompt([HI[0]])
    assert pair.chosen.tokens == prompt + [9906, 128009] and pair.rejected.tokens == prompt + [1383, 68, 128009]
    assert pair.chosen.labels == [X] * len(prompt) + [9906, 128009]
    assert pair.rejected.labels == [X] * len(prompt) + [1383, 68, 128009]


def test_bundled_samples_load_without_a_single_bad_record(llama_format):
    examples, report = load_sft(SAMPLES["pirate"], llama_format, max_len=256, on_error="raise")
    assert len(examples) > 200 and not report.truncated
    pairs, _ = load_preferences(SAMPLES["pirate_preferences"], llama_format, max_len=256, on_error="raise")
    assert len(pairs) > 100
    for e in examples:  # every reply in the persona's format
        reply = llama_format.tokenizer.decode([t for t in e.labels if t != X])
        assert reply.startswith("Ahoy, matey!") and reply.endswith("Fair winds!<|eot_id|>")


# ---- split, packing, batches ---------------------------------------------------------------------------------------

def examples_of_lengths(*lengths):
    return [Example(list(range(100 * i, 100 * i + n)), [X] + list(range(100 * i + 1, 100 * i + n)), line=i)
            for i, n in enumerate(lengths)]


def test_validation_split_is_fixed_and_disjoint():
    items = list(range(50))
    train, val = split_validation(items, 0.1, seed=3)
    assert len(val) == 5 and sorted(train + val) == items
    assert split_validation(items, 0.1, seed=3) == (train, val)
    assert split_validation(items, 0.1, seed=4)[1] != val
    assert split_validation(items, 0.0, seed=3) == (items, [])
    with pytest.raises(DataError, match="leaves no training examples"):
        split_validation([1], 0.5, seed=0)


def test_packing_fills_rows_and_restarts_positions():
    rows = pack(examples_of_lengths(3, 4, 2, 5, 2), max_len=8)
    assert [len(r.tokens) for r in rows] == [7, 7, 2]
    assert rows[0].positions == [0, 1, 2, 0, 1, 2, 3]
    assert rows[0].tokens == [0, 1, 2, 100, 101, 102, 103]
    assert rows[0].labels == [X, 1, 2, X, 101, 102, 103]  # an example's first token is never a target
    assert rows[1].positions == [0, 1, 0, 1, 2, 3, 4]


def test_collate_shifts_and_pads():
    rows = pack(examples_of_lengths(3, 2), max_len=3)
    inputs, targets, positions = collate(rows, pad_id=7)
    assert inputs.tolist() == [[0, 1], [100, 7]]
    assert targets.tolist() == [[1, 2], [101, X]]
    assert positions.tolist() == [[0, 1], [0, 0]]
    assert collate(rows, pad_id=7, length=5)[0].shape == (2, 4)


def test_data_parallel_ranks_split_each_global_batch():
    rows = list(range(20))
    whole = Batches(rows, 4, seed=1)
    ranks = [Batches(rows, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for _ in range(12):  # several epochs: every row once per epoch, a partial batch dropped
        assert next(whole) == next(ranks[0]) + next(ranks[1])
    state = whole.state_dict()
    ahead = next(whole)
    whole.load_state_dict(state)
    assert next(whole) == ahead
    with pytest.raises(DataError, match="fewer than one global batch"):
        Batches(rows[:3], 4)


def test_fixed_batches_cover_every_row_once_and_keep_ranks_in_step():
    rows = list(range(5))
    per_rank = [list(fixed_batches(rows, 2, rank=r, world_size=2)) for r in range(2)]
    assert per_rank[0] == [([0, 1], True), ([4], True)]
    assert per_rank[1] == [([2, 3], True), ([0, 1], False)]  # runs in step with rank 0, counts nothing
