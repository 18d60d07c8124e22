"""Shared pieces for the evaluation tests: a byte-level tokenizer and a tiny random Llama using it."""

import torch

from llama3.args import ModelArgs
from llama3.llama import Llama
from llama3.model import Transformer


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then BOS 256 and EOS 257: the shared tokenizer interface in a few lines."""

    bos_id, eos_id, pad_id = 256, 257, 257
    stop_ids = frozenset({257})
    vocab_size = 258

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, **_) -> list[int]:
        return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    """A random debug-tiny Transformer (vocab 512 holds the 258 byte tokens) wrapped as a Llama."""
    args = ModelArgs.preset("debug-tiny", **overrides)
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.5)  # a peaked, input-dependent distribution: scores differ between choices
    return Llama(model.eval(), ByteTokenizer(), None, name=f"tiny-{seed}")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo", bos=True, eos=True)
    assert ids[0] == 256 and ids[-1] == 257
    assert tok.decode(ids) == "héllo"
