"""Pipeline parallelism: cut the Transformer into consecutive stages and run them under a
`torch.distributed.pipelining` schedule (GPipe, 1F1B, interleaved 1F1B).

Every stage receives (tokens or hidden states, positions) and passes (hidden states, positions) on, so each stage
can compute RoPE and the document mask for its micro-batch without extra communication.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..model import Transformer, rope_cos_sin
from .data import document_mask


class PipelineStageModule(nn.Module):
    """Layers [first, last) of a Transformer, with the embedding on the first stage and the final norm and output
    projection on the last. Parameter names are those of the whole model (`layers.N` keeps its N), so checkpoints
    do not depend on how the model was cut."""

    def __init__(self, model: Transformer, first: int, last: int, document_masking: bool):
        super().__init__()
        self.args = model.args
        self.document_masking = document_masking
        is_first, is_last = first == 0, last == model.args.n_layers
        self.tok_embeddings = model.tok_embeddings if is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(first, last)})
        self.norm = model.norm if is_last else None
        self.output = model.output if is_last else None

    def forward(self, x: Tensor, positions: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """x: tokens (B, T) on the first stage, hidden states (B, T, dim) after; positions (B, T)."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        cos, sin = rope_cos_sin(self.args, positions)
        mask = document_mask(positions) if self.document_masking else None
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.output is None:
            return h, positions
        return self.output(self.norm(h)).float()


def stage_layer_ranges(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Split the layers evenly; leftover layers go to the earliest stages, since the last one also carries the
    output projection (the largest matmul for a big vocabulary)."""
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return list(zip(bounds[:-1], bounds[1:]))


SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}


def build_pipeline(model: Transformer, pp_mesh: DeviceMesh, *, schedule: str, stages_per_rank: int,
                   n_microbatches: int, loss_fn: Callable, device: torch.device, document_masking: bool,
                   parallelize_stage: Callable[[nn.Module], nn.Module]):
    """This rank's stage modules (parallelized) and the schedule that runs them.

    Stages are assigned round-robin: rank r holds stages r, r + pp, ... (one stage per rank for GPipe and 1F1B).
    The loss function gets (logits, targets) per micro-batch; gradients are not rescaled by the schedule, so
    loss_fn owns the averaging."""
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    per_rank = stages_per_rank if schedule == "interleaved-1f1b" else 1
    n_stages = pp * per_rank
    ranges = stage_layer_ranges(model.args.n_layers, n_stages)
    parts, stages = [], []
    for stage_index in range(rank, n_stages, pp):
        part = parallelize_stage(PipelineStageModule(model, *ranges[stage_index], document_masking))
        parts.append(part)
        stages.append(PipelineStage(part, stage_index, n_stages, device, group=pp_mesh.get_group()))
    cls = SCHEDULES[schedule]
    runner = cls(stages if per_rank > 1 else stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                 scale_grads=False)
    has_first = any(s.is_first for s in stages)
    has_last = any(s.is_last for s in stages)
    return runner, parts, has_first, has_last
