"""Pretraining as a task of the training loop: a Transformer from a preset (random or from a checkpoint), token
shards or synthetic tokens, next-token loss on every token, and the model exported for `llama3.load`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch

from ..args import ModelArgs
from ..model import Transformer
from .checkpoint import is_rank0
from .config import ConfigError, Layout, TrainConfig
from .data import build_loader, data_tokenizer, dataset_dir
from .metrics import flops_per_token
from .trainer import Batch, NextTokenLoss


def architecture(args: ModelArgs) -> dict:
    """What two ModelArgs must share for one's weights to mean the same in the other (all but max_seq_len)."""
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": args.vocab_size, "ffn_hidden_dim": args.ffn_hidden_dim, "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling, "tie_embeddings": args.tie_embeddings}


class Pretraining:
    objective = NextTokenLoss()

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.args = cfg.model_args()
        self.document_masking = cfg.data.document_masking
        self.data_dir = dataset_dir(cfg.data.dataset)
        self.tokenizer = data_tokenizer(self.data_dir, self.args.vocab_size)

    def default_run_dir(self) -> str:
        return f"runs/{self.cfg.model.preset}-{datetime.now():%Y%m%d-%H%M%S}"

    def build_model(self, device: torch.device, dtype: torch.dtype) -> Transformer:
        """The whole model with its starting weights, on every rank: identical whatever the layout, since
        parallelize() only cuts it up afterwards."""
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        with torch.device(device):
            model = Transformer(self.args)
        if not cfg.model.init_from:
            model.init_weights(std=cfg.model.init_std)
            return model
        from ..weights import read_checkpoint
        ckpt = read_checkpoint(cfg.model.init_from)
        theirs, ours = architecture(ckpt.args), architecture(self.args)
        if theirs != ours:
            diff = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in ours if theirs[k] != ours[k])
            raise ConfigError(f"model.init_from {cfg.model.init_from}: not the configured model ({diff}); set "
                              f"model.preset / model.args to match")
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()}, strict=False)
        if self.args.tie_embeddings:  # the output projection is the embedding; checkpoints may omit it
            missing = [k for k in missing if k != "output.weight"]
        if missing or unexpected:
            raise ConfigError(f"model.init_from {cfg.model.init_from}: missing {missing}, unexpected {unexpected}")
        return model

    def build_data(self, layout: Layout, dp_rank: int) -> None:
        cfg = self.cfg
        self.val_steps = cfg.eval.steps * layout.grad_accum
        loader_args = dict(vocab_size=self.args.vocab_size, batch_size=layout.micro_batch_size,
                           seq_len=cfg.data.seq_len, rank=dp_rank, world_size=layout.dp, seed=cfg.run.seed,
                           val_fraction=cfg.data.val_fraction)
        self.train_data = build_loader(self.data_dir, split="train", **loader_args)
        self.val_data = build_loader(self.data_dir, split="val", **loader_args) if cfg.eval.every >= 0 else None
        self.val_start = self.val_data.state_dict() if self.val_data is not None else None

    def val_batches(self):
        """eval.steps global batches of validation data; the same batches every time."""
        self.val_data.load_state_dict(self.val_start)
        return ((next(self.val_data), True) for _ in range(self.val_steps))

    def collate(self, raw) -> Batch:
        """Positions restart at each document only with document masking; otherwise a row is one sequence,
        0..T-1, whatever documents it holds."""
        inputs, targets, positions = raw
        if not self.document_masking:
            positions = torch.arange(inputs.shape[1]).repeat(inputs.shape[0], 1)
        return Batch(inputs, targets, positions, inputs.numel())

    def flops_per_token(self, seq_len: float) -> float:
        return flops_per_token(self.args, self.cfg.data.seq_len)

    def describe(self, trainer) -> str:
        return (f"training {self.cfg.model.preset} ({self.args.num_params() / 1e6:.1f}M parameters), "
                f"{self.cfg.data.seq_len} tokens per sequence")

    def export(self, trainer) -> Path | None:
        """Write the trained model where `llama3.load` and `llama3 chat` read it (Hugging Face layout)."""
        state = trainer.full_state_dict()
        if not is_rank0():
            return None
        from ..export import save_checkpoint
        path = trainer.run_dir / "model"
        save_checkpoint(path, self.args, state, layout=self.cfg.checkpoint.export_layout, tokenizer=self.tokenizer)
        trainer.writer.print(f"model: {path}")
        return path
