"""LoRA: low-rank adapters on the model's linear layers, added from outside the model.

A targeted `nn.Linear` W becomes `LoRALinear`: y = W x + (alpha / rank) * B A dropout(x), with A (rank, in) random
and B (out, rank) zero, so training starts from the base model exactly. Only A and B train; they stay in fp32
whatever the base's dtype. For QLoRA the frozen W is stored in 4 bits (qlora.py). Adapters are saved alone
(adapter.safetensors + adapter_config.json), loaded onto any copy of the base, or merged into it for export.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .qlora import Linear4bit, QuantKind

TARGET_GROUPS = {"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w1", "w2", "w3")}
ALL_TARGETS = TARGET_GROUPS["attention"] + TARGET_GROUPS["mlp"]
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


class AdapterError(ValueError):
    """An adapter that does not fit: the message names the file and what is wrong."""


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # on the adapters' input; each dropped copy is kept for backward (activation memory)
    targets: str = "all"  # comma-separated: attention, mlp, all, or projection names (wq, wk, wv, wo, w1, w2, w3)

    def target_names(self) -> tuple[str, ...]:
        names = []
        for item in (t.strip() for t in self.targets.split(",")):
            if item == "all":
                names += ALL_TARGETS
            elif item in TARGET_GROUPS:
                names += TARGET_GROUPS[item]
            elif item in ALL_TARGETS:
                names.append(item)
            else:
                raise ValueError(f"lora.targets: unknown target {item!r}; use attention, mlp, all or any of "
                                 f"{', '.join(ALL_TARGETS)}")
        return tuple(n for n in ALL_TARGETS if n in names)

    def check(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        self.target_names()


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear | Linear4bit, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        device = base.packed.device if isinstance(base, Linear4bit) else base.weight.device
        # Linear modules (not bare matrices) so that tensor parallelism can lay them out like the base.
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=device)  # nn.Linear's own random init
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=device)
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        # Scale the small (..., rank) activation rather than the (..., out) product, and add into the base output
        # in place (a linear layer's backward does not need its output): fewer activation-sized temporaries. A
        # tensor-parallel layer's output is a view of its DTensor, which autograd does not let change in place.
        h = self.lora_a(self.dropout(x).to(self.lora_a.weight.dtype))  # (..., rank)
        delta = self.lora_b(h * self.scale).to(out.dtype)
        return out + delta if out._is_view() else out.add_(delta)

    def base_weight(self) -> Tensor:
        return self.base.dequantize() if isinstance(self.base, Linear4bit) else self.base.weight

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain linear layer computing what this one computes (with dropout off)."""
        w = self.base_weight()
        merged = w.float() + self.scale * (self.lora_b.weight.float() @ self.lora_a.weight.float())
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=False, device=w.device, dtype=w.dtype)
        linear.weight.copy_(merged)
        return linear.requires_grad_(False)


def _replace(model: nn.Module, fn) -> list[str]:
    """Swap each linear layer inside the transformer blocks for fn(name, layer) (None keeps it); the names swapped."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        if not parent_name.startswith("layers."):
            continue
        for name, child in list(parent.named_children()):
            new = fn(name, child)
            if new is not None:
                setattr(parent, name, new)
                swapped.append(f"{parent_name}.{name}")
    return swapped


def add_lora(model: nn.Module, cfg: LoRAConfig, quant: QuantKind | None = None, block_size: int = 64,
             device: torch.device | str | None = None) -> list[str]:
    """Freeze the model and wrap the targeted projections of every block with adapters; with `quant`, store every
    frozen projection of the blocks in 4 bits first (QLoRA), each moved to `device` just before it is quantized so
    the full-precision model never has to fit there. Returns the names of the wrapped layers."""
    cfg.check()
    targets = cfg.target_names()
    model.requires_grad_(False)

    def wrap(name: str, layer: nn.Module):
        if not isinstance(layer, (nn.Linear, Linear4bit)):
            return None
        if quant is not None and isinstance(layer, nn.Linear):
            layer = Linear4bit.from_linear(layer.to(device), quant, block_size)
        if name in targets:
            return LoRALinear(layer, cfg.rank, cfg.alpha, cfg.dropout)
        return layer if quant is not None else None

    wrapped = [name for name in _replace(model, wrap) if isinstance(model.get_submodule(name), LoRALinear)]
    if not wrapped:
        raise AdapterError(f"no layer matched lora.targets={cfg.targets!r}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model, for as long as the block runs: DPO's reference model without a second copy of the weights."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and turn 4-bit layers back into plain ones: the model is then an ordinary
    Transformer again, with Meta's parameter names, ready to save in any layout."""
    def unwrap(name: str, layer: nn.Module):
        if isinstance(layer, LoRALinear):
            return layer.merged()
        if isinstance(layer, Linear4bit):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device=layer.packed.device,
                               dtype=layer.dtype)
            linear.weight.data.copy_(layer.dequantize())
            return linear.requires_grad_(False)
        return None
    _replace(model, unwrap)
    return model


# ---- saving and loading adapters ------------------------------------------------------------------------------------

def adapter_state_dict(state: dict[str, Tensor] | nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of a model or state dict, keyed as adapter files key them: 'layers.0.attention.wq.lora_a'
    for the module's 'layers.0.attention.wq.lora_a.weight'."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    return {k.removesuffix(".weight"): v for k, v in state.items() if k.endswith((".lora_a.weight", ".lora_b.weight"))}


def save_adapter(path: str | Path, state: dict[str, Tensor], cfg: LoRAConfig, *, base_model: str = "",
                 model_args=None) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, path / ADAPTER_WEIGHTS)
    meta = {"lora": asdict(cfg), "base_model": base_model}
    if model_args is not None:
        meta["model"] = {"dim": model_args.dim, "n_layers": model_args.n_layers, "vocab_size": model_args.vocab_size}
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise AdapterError(f"{path}: not an adapter directory ({f.name} is missing)")
    try:
        meta = json.loads(config_file.read_text())
        cfg = LoRAConfig(**meta["lora"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AdapterError(f"{config_file}: not a valid adapter config ({e})") from None
    try:
        state = load_file(weights_file)
    except SafetensorError as e:
        raise AdapterError(f"{weights_file}: {e}") from None
    return cfg, state, meta


def load_adapter(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Wrap the model's layers as the adapter was trained and load its tensors; names and shapes must match."""
    cfg, state, _ = read_adapter(path)
    try:
        add_lora(model, LoRAConfig(**{**asdict(cfg), "dropout": 0.0}))
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{path}: the adapter does not fit this model: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]} (was it trained on another base model?)")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise AdapterError(f"{path}: {name} has shape {tuple(tensor.shape)}, this model needs "
                               f"{tuple(expected[name].shape)} (was it trained on another base model?)")
    model.load_state_dict({f"{k}.weight": v for k, v in state.items()}, strict=False)
    return cfg


def apply_adapter(llm, path: str | Path, *, merge: bool = True):
    """Load an adapter onto a loaded model (`llama3.load(...)`), merged into the weights by default so that
    generation runs at the base model's speed. Returns the same Llama."""
    load_adapter(llm.model, path)
    if merge:
        merge_lora(llm.model)
    return llm


def merge_adapter(adapter: str | Path, dst: str | Path, *, base: str | None = None, to: str = "hf", shards: int = 1,
                  dtype: str | torch.dtype | None = None) -> Path:
    """Load the base (default: the one the adapter records) at full precision, fold the adapter into its weights
    and write it in the Hugging Face or Meta layout, tokenizer and chat template included. A QLoRA adapter merges
    into the unquantized base."""
    from ..export import save_checkpoint
    from ..llama import load
    base = base or read_adapter(adapter)[2].get("base_model")
    if not base:
        raise AdapterError(f"{adapter}: the adapter does not record its base model; name it (--model)")
    llm = apply_adapter(load(base, dtype=dtype), adapter)
    save_checkpoint(Path(dst), llm.args, llm.model.state_dict(), layout=to, tokenizer=llm.tokenizer,
                    chat_template=getattr(llm.tokenizer, "chat_template", None), shards=shards)
    return Path(dst)
