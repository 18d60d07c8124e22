"""Meta's Llama 3 end to end: model, tokenizer, weights, generation and chat."""

from .args import ModelArgs
from .llama import Llama, load
from .model import Transformer

__all__ = ["ModelArgs", "Transformer", "Llama", "load", "Tokenizer", "ChatFormat"]


def __getattr__(name):  # the tokenizer pulls in tiktoken and the tokenizer file: load it on first use
    if name in ("Tokenizer", "ChatFormat"):
        from . import tokenizer
        return getattr(tokenizer, name)
    raise AttributeError(f"module 'llama3' has no attribute {name!r}")
