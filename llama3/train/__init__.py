"""Pretraining: `llama3 train [--config FILE] [key=value ...]`, or under torchrun `python -m llama3.train ...`.

The trainer (and torch.distributed with it) is imported on first use, so the CLI stays quick to start.
"""

from __future__ import annotations


def train(overrides: list[str] | None = None, *, config: str | None = None, report: str | None = None
          ) -> list[float]:
    """Pretrain a Llama model; with no arguments, the debug preset on the built-in corpus. Under torchrun the
    processes form one DeviceMesh: `torchrun --nproc-per-node 4 -m llama3.train parallel.tp=2`. With
    `ft.replicas=N` it runs N torchft replica groups that survive each other's death (llama3/train/ft.py).

    Args:
        overrides: section.key=value settings applied after the config file, e.g. training.steps=100 parallel.tp=2
        config: TOML, JSON or YAML file with the training configuration
        report: instead of training, print goodput, faults and recovery times of this run directory
    """
    if report is not None:
        from .report import format_report, summarize
        print(format_report(summarize(report)))
        return []
    from .config import load_config
    cfg = load_config(config, overrides)
    if cfg.ft.replicas and cfg.ft.replica_id is None:  # the launcher of the torchft replica groups
        from datetime import datetime

        from .ft import launch
        launch(cfg, config, list(overrides or []),
               cfg.run.dir or f"runs/{cfg.model.preset}-{datetime.now():%Y%m%d-%H%M%S}")
        return []
    from .pretrain import Pretraining
    from .trainer import Trainer
    trainer = Trainer(cfg, Pretraining(cfg))
    try:
        return trainer.fit()
    except Exception as e:  # the next start's record tells this rank's error from a rank that died
        trainer.events.set_status("failed", what=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        raise
    finally:
        trainer.close()


def serve_as_spare(overrides: list[str]) -> None:
    """A spare torchft replica group (started by `llama3 train ft.replicas=N`): import everything a group needs
    now (torch, the trainer, torchft, the optimizer's lazy imports), then wait for the launcher to name the group
    it replaces (a JSON list of settings on stdin) and train as that group."""
    import json
    import os
    import sys
    import time

    import torch
    import torchft  # noqa: F401

    from .pretrain import Pretraining  # noqa: F401
    from .trainer import Trainer  # noqa: F401
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # torch.optim imports torch._dynamo on first use
    line = sys.stdin.readline()
    if not line.strip():
        return  # the run ended without needing this spare
    os.environ["LLAMA3_STARTED_AT"] = str(time.time())  # its start-up begins now, not at its (early) launch
    train(overrides + json.loads(line))
