import json

import numpy as np
import pytest
import torch

from llama3.data import DataError, PrepareConfig, QualityConfig, TokenLoader, TokenShards
from llama3.data.loader import validation_documents
from llama3.data.prepare import prepare
from data_testkit import TOKENIZER, make_document


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 documents of varied length over several shards (about 5k tokens)."""
    root = tmp_path_factory.mktemp("loader")
    lines = "".join(json.dumps({"text": make_document(seed, 10 + 7 * seed % 60)}) + "\n" for seed in range(40))
    (root / "docs.jsonl").write_text(lines)
    config = PrepareConfig(quality=QualityConfig.off(), shard_tokens=1000)
    prepare([root / "docs.jsonl"], root / "out", TOKENIZER, config, workers=1, progress=False)
    return root / "out"


def stream_of(data_dir, docs) -> np.ndarray:
    shards = TokenShards(data_dir)
    return np.concatenate([shards.document(i) for i in docs]).astype(np.int64)


def test_batches_are_shifted_windows_of_the_document_stream(data_dir):
    shards = TokenShards(data_dir)
    assert len(shards.tokens) > 3  # the stream really crosses shard boundaries
    stream = stream_of(data_dir, range(shards.num_documents))
    loader = TokenLoader(data_dir, batch_size=4, seq_len=32, val_fraction=0.0)
    assert loader.num_windows == (len(stream) - 1) // 32
    for _ in range(3):
        windows = loader.batch_windows(loader.epoch, loader.step)
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == targets.dtype == torch.long
        for row, w in enumerate(windows):
            expected = stream[w * 32 : w * 32 + 33]
            assert inputs[row].tolist() == expected[:-1].tolist()
            assert targets[row].tolist() == expected[1:].tolist()


def test_resume_gives_identical_batches_across_epochs(data_dir):
    kwargs = dict(batch_size=3, seq_len=64, seed=7)
    loader = TokenLoader(data_dir, **kwargs)
    for _ in range(loader.steps_per_epoch - 2):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint file
    expected = [next(loader) for _ in range(loader.steps_per_epoch + 3)]  # runs into epochs 1 and 2
    assert loader.epoch == 2

    resumed = TokenLoader(data_dir, **kwargs)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in expected)):
        assert all(torch.equal(a, b) for a, b in zip(want, got))

    fresh = TokenLoader(data_dir, **kwargs)
    assert not torch.equal(next(fresh)[0], expected[0][0])  # resuming really moved it
    with pytest.raises(ValueError, match="seq_len=64"):
        TokenLoader(data_dir, batch_size=3, seq_len=32, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=7"):
        TokenLoader(data_dir, batch_size=3, seq_len=64, seed=8).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_see_disjoint_windows_that_cover_the_epoch(data_dir, world_size):
    loaders = [TokenLoader(data_dir, 2, 16, rank=r, world_size=world_size, seed=3) for r in range(world_size)]
    steps = loaders[0].steps_per_epoch
    seen = []
    for loader in loaders:
        assert loader.steps_per_epoch == steps
        windows = [loader.batch_windows(0, step) for step in range(steps)]
        for batch_windows in windows:
            inputs, _ = next(loader)
            assert inputs[0, 0] == loader._read(int(batch_windows[0]) * 16, 1)[0]
        seen.append(set(np.concatenate(windows).tolist()))
    union = set().union(*seen)
    assert sum(map(len, seen)) == len(union) == steps * 2 * world_size  # disjoint
    assert loaders[0].num_windows - len(union) < 2 * world_size  # complete but for a partial batch
    # Next epoch, new order.
    assert not np.array_equal(loaders[0].batch_windows(1, 0), loaders[0].batch_windows(0, 0))


def test_positions_restart_at_every_document(data_dir):
    loader = TokenLoader(data_dir, 4, 128, val_fraction=0.0, return_positions=True)
    starts = 0
    for _ in range(5):
        inputs, _, positions = next(loader)
        assert positions.shape == inputs.shape and positions.dtype == torch.long
        is_bos = inputs == TOKENIZER.bos_id
        assert torch.equal(positions == 0, is_bos)
        # Inside a document positions count up by one.
        assert torch.equal((positions[:, 1:] - positions[:, :-1])[~is_bos[:, 1:]], torch.ones(int((~is_bos[:, 1:]).sum()), dtype=torch.long))
        starts += int(is_bos.sum())
    assert starts > 5


def test_validation_split_holds_out_whole_documents(data_dir):
    n = TokenShards(data_dir).num_documents
    held_out = validation_documents(n, 0.1)
    assert len(held_out) == 4 and np.array_equal(held_out, validation_documents(n, 0.1))
    assert len(validation_documents(n, 0.001)) == 1  # never empty when asked for
    train = TokenLoader(data_dir, 1, 16, split="train", val_fraction=0.1)
    val = TokenLoader(data_dir, 1, 16, split="val", val_fraction=0.1, shuffle=False)
    kept = [i for i in range(n) if i not in set(held_out.tolist())]
    assert train.stream_tokens == len(stream_of(data_dir, kept))
    assert val.stream_tokens == len(stream_of(data_dir, held_out))
    val_stream = stream_of(data_dir, held_out)
    inputs, targets = next(val)  # unshuffled: the first window of the held-out documents
    assert inputs[0].tolist() == val_stream[:16].tolist() and targets[0].tolist() == val_stream[1:17].tolist()
    train_windows = {tuple(train._read(w * 16, 17)) for w in range(train.num_windows)}
    assert tuple(val_stream[:17]) not in train_windows


def test_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="fewer than one batch"):
        TokenLoader(data_dir, batch_size=64, seq_len=1024)
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenLoader(tmp_path, 1, 8)
    with pytest.raises(ValueError, match="rank 2"):
        TokenLoader(data_dir, 1, 8, rank=2, world_size=2)
