"""Pretraining: `llama3 train` / `torchrun -m llama3.train`."""

from .config import ConfigError, TrainConfig, load_config
from .trainer import Trainer, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "load_config", "train"]
