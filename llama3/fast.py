"""fp32 inference on CPU through oneDNN, applied to a loaded model from outside: every nn.Linear is swapped for a
PackedLinear whose weight is reordered once into oneDNN's blocked layout.

Why: torch's F.linear hands fp32 matmuls to MKL, which on the AMD EPYC machines we measured reaches a third of the
matmul roof at a 512-token prompt's shapes, and costs 7x more for 2 to 16 rows than for one (it repacks the weight
on every call). With a prepacked weight oneDNN runs the same prompt 1.5-3x faster and takes about as long for 5
rows as for 1, which is what makes checking k drafted tokens in one pass cheap (speculative decoding). See
docs/PERFORMANCE.md for the measurements.

Inference only: the packed weights are opaque oneDNN tensors (no autograd, no state_dict export). With tied
embeddings the output projection gets its own packed copy (the embedding keeps its rows for the lookup).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model import Transformer

_ROWS_HINT = 512  # oneDNN picks the blocked layout for this many rows; measured as fast for 1 row as any hint


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
        return packed_linear(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], self.out_features)


# An opaque op for torch.compile: inductor cannot lower the oneDNN call with the packed weight as a graph input,
# but calls a custom op as it is.
@torch.library.custom_op("llama3::packed_linear", mutates_args=())
def packed_linear(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@packed_linear.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


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
