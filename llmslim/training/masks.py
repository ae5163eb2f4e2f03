"""Sparsity masks through training: the Linears a sparsity stage pruned keep every zero while distill or qat
trains, and in what they write.

Which Linears: PlanState.sparse_linears (full names, model.layers.i.name), recorded by the sparsity stages'
plan. Which weights: the exact zeros of those Linears in the training stage's input. That input is the
sparsity stage's output (or what an earlier training stage kept), and it is the same file when a killed
stage resumes, so a resumed run derives the same mask.

The mask acts in the forward pass, so the model that trains is the model that is written, under one
process, DDP and FSDP2 alike (the mask is a buffer beside the weight, not a hook on a parameter that FSDP2
replaces with its shards):
- trainable all: `MaskedLinear` computes x (W with the pruned entries 0)ᵀ. A pruned weight's gradient is
  exactly 0, so AdamW leaves it exactly 0 (its moments stay 0, decoupled decay multiplies 0) and no
  re-masking after a step is needed; the state-dict names are nn.Linear's.
- LoRA (distill trainable: lora): `MaskedLora` around peft's LoRA Linear computes base(x) + dropout(x) Δᵀ
  with Δ = (alpha/r) B A, its pruned entries 0; the frozen base has its zeros already. `merge_masked`
  writes W + Δ, zeros in place (peft's own merge would add the dense Δ).
- qat: QatLinear takes the mask itself (llmslim.training.fakequant).
`zero_counts` is what the stage notes say: the zeros before training and after, counted in what is written.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskedLinear(nn.Linear):
    """An nn.Linear (the same weight and bias Parameters) whose pruned weights are 0 in every forward."""

    pruned: Tensor  # [out, in] bool, True = pruned (a non-persistent buffer: rebuilt from the input's zeros)

    def __init__(self, lin: nn.Linear, pruned: Tensor):
        nn.Module.__init__(self)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = lin.weight
        self.register_parameter("bias", lin.bias)
        self.register_buffer("pruned", pruned.to(lin.weight.device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.masked_fill(self.pruned, 0), self.bias)


class MaskedLora(nn.Module):
    """A peft LoRA Linear whose update Δ = (alpha/r) B A is 0 at the pruned weights, in the forward and merged."""

    pruned: Tensor

    def __init__(self, lora: Any, pruned: Tensor):
        super().__init__()
        self.lora = lora
        self.register_buffer("pruned", pruned.to(lora.base_layer.weight.device), persistent=False)

    def delta(self) -> Tensor:
        """Δ [out, in] with the pruned entries 0 (differentiable in B and A)."""
        return self.lora.get_delta_weight(self.lora.active_adapters[0]).masked_fill(self.pruned, 0)

    def forward(self, x: Tensor) -> Tensor:
        name = self.lora.active_adapters[0]
        # the base's zeros are in its weight; the adapters' path as peft computes it, through the masked Δ
        return self.lora.base_layer(x) + F.linear(self.lora.lora_dropout[name](x), self.delta().to(x.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear holding W + Δ (float32): the pruned weights exactly 0."""
        base = self.lora.base_layer
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        plain.weight.data = (base.weight.float() + self.delta().float()).masked_fill(self.pruned, 0)
        if base.bias is not None:
            plain.bias.data = base.bias.data
        return plain


def sparse_masks(model: nn.Module, names: tuple[str, ...] | list[str]) -> dict[str, Tensor]:
    """name -> pruned [out, in] bool: the exact zeros of each named Linear's weight in `model` (a plain
    transformers model, before adapters are added)."""
    return {name: model.get_submodule(name).weight.detach() == 0 for name in names}


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> int:
    """Keep the masks in the forward of `model` (a transformers model, or peft's base model with LoRA layers
    injected): a LoRA Linear becomes a MaskedLora, a trainable plain Linear a MaskedLinear; a frozen plain
    Linear keeps its zeros as it is. Returns how many Linears were wrapped."""
    wrapped = 0
    for name, pruned in masks.items():
        parent_name, _, child = name.rpartition(".")
        parent, module = model.get_submodule(parent_name), model.get_submodule(name)
        if hasattr(module, "base_layer"):  # peft's LoRA layer
            setattr(parent, child, MaskedLora(module, pruned))
        elif isinstance(module, nn.Linear) and module.weight.requires_grad:
            setattr(parent, child, MaskedLinear(module, pruned))
        else:
            continue
        wrapped += 1
    return wrapped


def merge_masked(model: nn.Module) -> None:
    """Replace every MaskedLora of `model` by its merged plain Linear (before peft merges the other adapters)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedLora):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())


@torch.no_grad()
def zero_counts(masks: dict[str, Tensor], weights: dict[str, Tensor]) -> dict[str, Any]:
    """What the notes say about the masked Linears: the zeros before training, those of them still exactly 0
    in `weights` (name -> the weight as written), all zeros after, and the measured sparsity."""
    before = kept = after = total = 0
    for name, pruned in masks.items():
        w = weights[name]
        pruned = pruned.to(w.device)
        before += int(pruned.sum())
        kept += int((w[pruned] == 0).sum())
        after += int((w == 0).sum())
        total += w.numel()
    return {"linears_masked": len(masks), "zeros_before": before, "zeros_kept": kept, "zeros_after": after,
            "sparsity_measured": float(f"{after / max(total, 1):.6g}")}
