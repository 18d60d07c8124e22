"""Parallelism applied from outside the model, in one fixed order: tensor parallel -> activation checkpointing ->
compile -> FSDP. Works on a whole Transformer or on one pipeline stage of it (same attribute names).

One DeviceMesh holds every degree: ("pp", "dp_replicate", "dp_shard", "tp"), tp innermost so that its frequent
collectives stay between neighbouring ranks (the GPUs of one node).
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..fast import can_use_onednn_linears, use_onednn_linears
from ..model import Attention
from .config import Layout, LoopConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    shape = (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    # Reducing a DTensor over FSDP x TP parameters (the gradient norm) takes one collective over the flattened
    # dimensions when the mesh knows them, instead of one per dimension.
    mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
    mesh["dp_replicate", "dp_shard", "tp"]._flatten("dp_tp")
    return mesh


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """FSDP's mesh: 1-D (shard) or 2-D (replicate, shard). Replicate-only is DDP: FSDP2 with shards of the whole."""
    if mesh["dp_replicate"].size() == 1:
        return mesh["dp_shard"]
    return mesh["dp_replicate", "dp_shard"]


def parallelize(model: nn.Module, mesh: DeviceMesh | None, cfg: LoopConfig, *, param_dtype: torch.dtype,
                pipelined: bool = False, loss_parallel: bool = False) -> nn.Module:
    """Apply the configured parallelism in place. `mesh` None: a single process (only AC and compile apply).
    `loss_parallel`: under TP the logits stay sharded over the vocabulary (the loss must run in loss_parallel())."""
    tensor_parallel = mesh is not None and mesh["tp"].size() > 1
    if tensor_parallel:
        apply_tensor_parallel(model, mesh["tp"], loss_parallel=loss_parallel)
    elif cfg.training.onednn_linears and param_dtype == torch.float32 and can_use_onednn_linears(model):
        use_onednn_linears(model)
    if cfg.training.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.training.activation_checkpointing)
    if cfg.training.compile:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, data_parallel_mesh(mesh), param_dtype=param_dtype, reshard_after_forward=not pipelined)
    return model


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Megatron-style TP with sequence parallel: the residual stream between blocks is split over the sequence
    (Shard(1)); attention and feed-forward gather it, run on their share of heads / hidden units, and
    reduce-scatter back. With loss_parallel the logits stay split over the vocabulary into the loss."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
        top["output"] = ColwiseParallel(input_layouts=Shard(1),
                                        output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                        use_local_output=not loss_parallel)
    parallelize_module(model, tp_mesh, top)
    if getattr(model, "args", None) is not None and model.args.tie_embeddings and model.norm is not None:
        model.output.weight = model.tok_embeddings.weight  # both are Shard(0) over the vocabulary: one parameter

    # Attention.forward takes (x, cos, sin, mask, cache, positions, kv_len); only x is sequence-sharded.
    n_attention_args = len(inspect.signature(Attention.forward).parameters) - 1
    none_args = (None,) * (n_attention_args - 1)
    for block in model.layers.children():
        block_plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), *none_args),
                                            desired_input_layouts=(Replicate(), *none_args)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        }
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                     "feed_forward.w3", "feed_forward.w2"):
            block_plan.update(projection_plan(block, name))
        parallelize_module(block, tp_mesh, block_plan)
    for name, p in model.named_parameters():  # SequenceParallel's replicated parameters come back trainable
        if name in frozen:
            p.requires_grad_(False)


def projection_plan(block: nn.Module, name: str) -> dict:
    """Column-wise for the projections out of the residual stream, row-wise (reduce-scattered over the sequence)
    for those back into it. A LoRA-wrapped projection (base, lora_a, lora_b) is split so that the adapter's output
    B A x comes out laid out as the base's W x: column-wise, A's small (rank) output is gathered and B is split
    like W; row-wise, A is row-wise and reduce-scattered like W, and B runs replicated on each sequence shard."""
    rowwise = name.endswith((".wo", ".w2"))
    base = RowwiseParallel(output_layouts=Shard(1)) if rowwise else ColwiseParallel()
    if not hasattr(block.get_submodule(name), "lora_a"):
        return {name: base}
    if rowwise:
        adapter = (RowwiseParallel(output_layouts=Shard(1)), SequenceParallel(use_local_output=True))
    else:
        adapter = (ColwiseParallel(output_layouts=Replicate()), ColwiseParallel())
    return {f"{name}.base": base, f"{name}.lora_a": adapter[0], f"{name}.lora_b": adapter[1]}


# Selective activation checkpointing keeps what is expensive to recompute (matmuls, attention, TP collectives) and
# recomputes the rest (norms, RoPE, SwiGLU's element-wise products), which is most of the activation memory.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.llama3.onednn_linear.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every block: "full" recomputes the whole block in backward, "selective" only its cheap ops."""
    for name, block in model.layers.named_children():
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False,
                                         context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls_policy))
        model.layers.register_module(name, wrapped)


def apply_compile(model: nn.Module) -> None:
    """Compile each block's forward. Compiling the method rather than the module keeps parameter names unchanged
    and leaves the FSDP hooks (added later, on the module) outside the compiled graph. All blocks share one
    compiled graph since they are the same code on same-shaped inputs."""
    for block in model.layers.children():
        block.forward = torch.compile(block.forward)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype,
               reshard_after_forward: bool = True) -> None:
    """Shard each block as one communication group, then the rest (embeddings, final norm, output) at the root.

    Gradients are reduced in fp32 whatever the compute dtype. Under a pipeline schedule the parameters stay
    gathered between micro-batches (reshard_after_forward=False) instead of being gathered again for each."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.children():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
