import os

import pytest
import torch

from llama3.args import ModelArgs
from llama3.model import Transformer


def tiny_args(**overrides) -> ModelArgs:
    """A random-weight model small enough for every test: GQA (4 heads, 2 kv heads), 2 layers."""
    return ModelArgs.preset("debug-tiny", **overrides)


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.1)
    with torch.no_grad():  # non-trivial norm weights so a wrongly mapped norm cannot pass unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def default_gguf_path():
    """The default model's GGUF file, pulled into the cache on first use (set LLAMA3_OFFLINE=1 to skip instead)."""
    from llama3 import hub
    path = hub.local_path(hub.DEFAULT_MODEL)
    if path is None:
        if os.environ.get("LLAMA3_OFFLINE"):
            pytest.skip("default model not pulled and LLAMA3_OFFLINE is set")
        path = hub.pull(hub.DEFAULT_MODEL)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_gguf_path):
    """A random 2-layer model with the default model's tokenizer (49152 tokens) and ChatML template, in HF layout."""
    from llama3.export import save_checkpoint
    from llama3.tokenizer import BPETokenizer
    tokenizer = BPETokenizer.from_gguf(default_gguf_path)
    args = ModelArgs.preset("debug-tiny", vocab_size=49152, tie_embeddings=True, max_seq_len=512)
    path = tmp_path_factory.mktemp("tiny")
    save_checkpoint(path, args, random_model(args).state_dict(), tokenizer=tokenizer,
                    chat_template=tokenizer.chat_template)
    return path


@pytest.fixture
def one_thread():
    """Tiny models decode faster on one thread, and much faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
