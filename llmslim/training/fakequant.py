"""Fake quantization for QAT: the export's integer grid in the forward pass, straight-through gradients.

The grid is gptq/rtn's (llmslim.methods.gptq.core): per group of `gs` input columns a scale s and a zero
point z, q = round(clamp(w / s + z, qmin, qmax)), w_q = (q - z) * s, the same operations in the same order,
so the integers QAT trains on are the integers rtn would write for the same weights and parameters, and
the ones the export writes. Gradients (LSQ, Esser et al. 2020): round passes them straight through; clamp
stops them outside [qmin, qmax]; a learnable scale gets d w_q / d s through the same expression.

`QatLinear` wraps a peft LoRA Linear: its forward is x @ Q(W0 + (alpha / r) B A)^T, the merged weight on the
grid, so training sees exactly what will be served. With `merge=False` the integers q0 of W0 stay frozen and
the adapters stay apart: x @ ((q0 - z) s)^T + (alpha / r) B A x, the quantized base plus a LoRA adapter, as
vLLM serves them unmerged. With `pruned` (a sparsity mask, merge=True only) the merged weight's pruned
entries are 0 before and after Q, and the export puts the zero point there: a sparsity stage's zeros
survive training exactly (llmslim.training.masks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fake_quant(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, gs: int) -> Tensor:
    """w [out, in] on the grid of per-group scale/zero [out, in // gs], with straight-through gradients."""
    out, n = w.shape
    s, z = scale[..., None], zero[..., None]
    x = (w.reshape(out, n // gs, gs) / s + z).clamp(qmin, qmax)
    q = x + (x.round() - x).detach()
    return ((q - z) * s).reshape(out, n)


@torch.no_grad()
def integers(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, gs: int) -> Tensor:
    """The int8 q of `fake_quant` (what the export stores)."""
    out, n = w.shape
    x = (w.reshape(out, n // gs, gs) / scale[..., None] + zero[..., None]).clamp(qmin, qmax).round()
    return x.reshape(out, n).to(torch.int8)


def stored(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The scale as the export stores it (in `dtype`), back in the scale's precision, gradient straight
    through: training uses the values a loader will use."""
    return scale + (scale.to(dtype).to(scale.dtype) - scale).detach()


class QatLinear(nn.Module):
    """A peft LoRA Linear computing F.linear(x, Q(W0 + delta), bias): W0 frozen, delta = the adapters',
    Q the export grid (scale optionally learned, as exp(log_scale) so it stays positive)."""

    zero: Tensor  # [out, G] float, integer-valued (a buffer)
    scale0: Tensor  # [out, G] the starting scales, as stored (a buffer)

    q0: Tensor  # [out, in] the frozen integers (merge=False; a buffer)
    pruned: Tensor | None  # [out, in] bool, True = held at exactly 0 (a sparsity mask; a buffer)

    def __init__(self, lora: Any, scale: Tensor, zero: Tensor, bits: int, gs: int, *, learn_scales: bool,
                 export_dtype: torch.dtype, merge: bool = True, pruned: Tensor | None = None):
        super().__init__()
        self.lora = lora
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.gs, self.export_dtype = gs, export_dtype
        start = scale.to(export_dtype).float()  # the starting grid, exactly as the export would store it
        self.learn_scales = learn_scales
        if learn_scales:
            self.log_scale = nn.Parameter(start.log())
        # not in the state dict: the stage rebuilds them (deterministically) before a resumed run loads its
        # state, and accelerate's FSDP2 loading expects every state-dict entry to be a sharded parameter
        self.register_buffer("scale0", start, persistent=False)
        self.register_buffer("zero", zero.float(), persistent=False)
        self.merge = merge
        if pruned is not None and not merge:
            raise ValueError("a sparsity mask needs merge=True: an adapter apart is dense over the base")
        self.register_buffer("pruned", pruned, persistent=False)
        if not merge:  # W0 is on the starting grid: its integers are the base, for good
            self.register_buffer("q0", integers(self.base.weight.float(), start, self.zero, self.qmin, self.qmax, gs),
                                 persistent=False)

    @property
    def base(self) -> nn.Linear:
        return self.lora.base_layer

    def scale(self) -> Tensor:
        return stored(self.log_scale.exp(), self.export_dtype) if self.learn_scales else self.scale0

    def merged(self) -> Tensor:
        """W0 + (alpha/r) B A [out, in], the pruned entries 0."""
        w = self.base.weight + self.lora.get_delta_weight(self.lora.active_adapters[0])
        return w if self.pruned is None else w.masked_fill(self.pruned, 0)

    def dequantized(self, q: Tensor, scale: Tensor) -> Tensor:
        """(q - z) s [out, in] float32 (gradients reach a learned scale)."""
        out, n = q.shape
        return ((q.float().reshape(out, n // self.gs, self.gs) - self.zero[..., None]) * scale[..., None]).reshape(out, n)

    def forward(self, x: Tensor) -> Tensor:
        if not self.merge:  # the frozen quantized base, the adapters beside it: what vLLM's LoRA computes
            name = self.lora.active_adapters[0]
            y = F.linear(x, self.dequantized(self.q0, self.scale()).to(x.dtype), self.base.bias)
            return y + self.lora.lora_B[name](self.lora.lora_A[name](x)) * self.lora.scaling[name]
        w = fake_quant(self.merged().float(), self.scale(), self.zero, self.qmin, self.qmax, self.gs)
        if self.pruned is not None:  # 0 on the grid whatever the zero point (the export writes it there)
            w = w.masked_fill(self.pruned, 0)
        return F.linear(x, w.to(x.dtype), self.base.bias)

    @torch.no_grad()
    def adapter(self) -> tuple[Tensor, Tensor, float]:
        """(B [out, r], A [r, in], scaling alpha / r) of the adapters, float32."""
        name = self.lora.active_adapters[0]
        return (self.lora.lora_B[name].weight.float(), self.lora.lora_A[name].weight.float(),
                float(self.lora.scaling[name]))

    @torch.no_grad()
    def changed(self, q: Tensor) -> int:
        """How many of the integers `q` differ from the starting ones (W0 on the starting grid)."""
        q0 = integers(self.base.weight.float(), self.scale0, self.zero, self.qmin, self.qmax, self.gs)
        return int((q0 != q).sum())

    @torch.no_grad()
    def export(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q int8 [out, in], scale [out, G] float32, zero int8 [out, G], the dequantized weight float32)."""
        scale = self.scale()
        q = self.q0 if not self.merge else integers(self.merged().float(), scale, self.zero, self.qmin, self.qmax,
                                                    self.gs)
        if self.pruned is not None:  # on the zero point: (z - z) s = 0 exactly
            q = torch.where(self.pruned, self.zero.repeat_interleave(self.gs, dim=1).to(torch.int8), q)
        return q, scale, self.zero.to(torch.int8), self.dequantized(q, scale)
