"""The continuous-batching engine on a tiny random model: batching changes no result, requests join and leave
freely, prompts are prefilled in chunks, cancellation frees slots, the queue is bounded."""

from __future__ import annotations

import threading

import pytest
import torch

from llama3.generate import SamplingParams
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
