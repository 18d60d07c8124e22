"""fp32 matmuls on CPU through oneDNN, applied to a model from outside:
  - inference: every nn.Linear swapped for a PackedLinear whose weight is reordered once into oneDNN's blocked
    layout (`prepack`);
  - training: every nn.Linear's forward and backward matmuls sent to oneDNN, parameters untouched
    (`use_onednn_linears`).

Why: torch's F.linear hands fp32 matmuls to MKL, which on the AMD EPYC machines we measured runs at about half the
fp32 roof (~200 of ~450 GFLOP/s at a training step's shapes, a third of the roof at a 512-token prompt's), and
costs 7x more for 2 to 16 rows than for one (it repacks the weight on every call). oneDNN runs the same shapes at
~450 GFLOP/s with a plain weight, faster still prepacked, and takes about as long for 5 rows as for 1, which is
what makes checking k drafted tokens in one pass cheap (speculative decoding). See docs/PERFORMANCE.md.

Prepacked weights are opaque oneDNN tensors (no autograd, no state_dict export); with tied embeddings the output
projection gets its own packed copy (the embedding keeps its rows for the lookup).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model import Transformer

_ROWS_HINT = 512  # oneDNN picks the blocked layout for this many rows; measured as fast for 1 row as any hint


# A custom op, so that torch.compile calls it as it is (inductor cannot lower the oneDNN call with a packed weight as
# a graph input) and so that training can give it a backward (below). The weight is plain or prepacked.
@torch.library.custom_op("llama3::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N), through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def can_prepack(model: Transformer) -> bool:
    """fp32 models on a CPU whose torch build has oneDNN."""
    w = model.norm.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    def __init__(self, weight: Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        self.register_buffer("weight", packed, persistent=False)  # not in state_dict: an opaque layout

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def prepack(model: Transformer) -> Transformer:
    """Swap the model's nn.Linear modules for PackedLinear, one at a time (each original weight is freed as soon as
    its packed copy exists, unless something else still holds it). Returns the model."""
    if not can_prepack(model):
        raise ValueError("prepacking needs an fp32 model on the CPU and a torch build with oneDNN")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            model.set_submodule(name, PackedLinear(module.weight))
    return model


# ---- training: oneDNN matmuls with autograd, parameters unchanged ----------------------------------------------

def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _onednn_linear_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    # Both gradients are matmuls of the same kind, so they go through oneDNN too; the transposed copies cost a
    # pass over memory each, small next to the matmul they make twice as fast.
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = onednn_linear(grad, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
    grad_w = onednn_linear(grad.t().contiguous(), x.t().contiguous()) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_save_inputs)


class OneDNNLinear(nn.Linear):
    """An nn.Linear (same parameter, same state dict) whose matmuls run in oneDNN, forward and backward."""

    def forward(self, x: Tensor) -> Tensor:
        out = onednn_linear(x.reshape(-1, self.in_features).contiguous(), self.weight)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def can_use_onednn_linears(model: nn.Module) -> bool:
    """fp32 parameters on a CPU whose torch build has oneDNN."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Turn the model's plain nn.Linear modules into OneDNNLinear in place (their parameters, names and hooks stay
    as they are). Not for tensor-parallel models: oneDNN's op has no DTensor sharding rule. Returns the model."""
    if not can_use_onednn_linears(model):
        raise ValueError("oneDNN linears need fp32 parameters on the CPU and a torch build with oneDNN")
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model
