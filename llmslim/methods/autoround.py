"""autoround: learned rounding and clipping (Cheng et al. 2023, AutoRound), per decoder layer.

Round-to-nearest picks each integer alone. AutoRound instead learns, for every weight, an offset v in
[-0.5, 0.5] added before rounding (q = round(w / s + v + z)), and for every group two factors alpha, beta in
[0.5, 1] that shrink its max and min (the clipping range), so that the decoder layer's *output* on
calibration tokens stays close to the full-precision model's. Gradients pass the rounding by the
straight-through estimator; the update is signed gradient descent (each parameter moves by the learning
rate in the direction of its gradient's sign), the learning rate decaying linearly to 0.

Objective of layer i: mean ||layer_q(x~) - layer(x)||^2, where x~ is what the quantized layers 0..i-1
produce and x what the full-precision model feeds layer i (so the error of earlier layers is compensated
too, as auto-round does by default). It starts at round-to-nearest (v = 0, alpha = beta = 1) and ends at
whichever of the start and the learned parameters has the lower objective on all calibration tokens,
measured with the exact exported weights: never worse than its RTN start (tested).

Symmetric grids are full range by default (`full_range`), as in auto-round: each group's largest-magnitude
weight sits on -2^(b-1), the scale negative when that weight is positive, so the 2^b integers span
2^(b-1) steps each side instead of gptq's (2^b - 1)/2: a step 8/7.5 finer at 4 bits, 4/3.5 at 3, in the
same format (int8 values in range, zero point 0; dequantization is q * scale whatever the sign). Its
gain on stories260K is in the README's PTQ results.

Layer at a time (one layer, its inputs on both streams and its full-precision outputs in memory),
resumable per layer like gptq; the export is compressed-tensors on the same grid as `rtn`/`gptq`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layerwise import LayerInputs, layer_output
from ..plan import PlanError, PlanState
from .configs.autoround import AutoRoundConfig
from .gptq.core import QuantResult, _params, _qrange, dequantize_groups
from .gptq.format import QuantFormat

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure core


def _round_ste(x: Tensor) -> Tensor:
    return x + (x.round() - x).detach()


@dataclass
class Rounding:
    """Learnable parameters of one [out, in] weight: offsets v [out, in], range factors [out, groups]."""

    v: Tensor
    alpha: Tensor
    beta: Tensor

    @classmethod
    def start(cls, W: Tensor, group_size: int) -> Rounding:
        out, n = W.shape
        groups = 1 if group_size == -1 else n // group_size
        return cls(torch.zeros_like(W, dtype=torch.float32), torch.ones(out, groups), torch.ones(out, groups))

    def tensors(self) -> list[Tensor]:
        return [self.v, self.alpha, self.beta]


def _ranges(W: Tensor, r: Rounding, gs: int) -> tuple[Tensor, Tensor, Tensor]:
    out, n = W.shape
    Wg = W.float().reshape(out, n // gs, gs)
    return Wg, Wg.amin(-1) * r.beta, Wg.amax(-1) * r.alpha


def full_range_scale(mn: Tensor, mx: Tensor, bits: int) -> Tensor:
    """Symmetric full-range scale of groups with minima `mn` <= 0 <= maxima `mx`: the side of larger
    magnitude lands on qmin = -2^(bits-1), hence a negative scale when it is the positive side; never 0."""
    big = torch.maximum(mn.abs(), mx)
    s = torch.where(mx > mn.abs(), -big, big) / 2 ** (bits - 1)
    eps = torch.finfo(torch.float32).eps
    return torch.where(s.abs() < eps, torch.full_like(s, eps), s)


def fake_quant(W: Tensor, r: Rounding, *, bits: int, group_size: int, symmetric: bool,
               full_range: bool = False) -> Tensor:
    """The dequantized weight for learnable `r`, differentiable in v, alpha and beta (straight-through
    rounding). Float32; the same grid as `final_weights` up to the scale's rounding to the checkpoint dtype."""
    out, n = W.shape
    gs = n if group_size == -1 else group_size
    qmin, qmax = _qrange(bits)
    Wg, mn, mx = _ranges(W, r, gs)
    mn, mx = mn.clamp(max=0.0), mx.clamp(min=0.0)
    if symmetric and full_range:
        s = full_range_scale(mn, mx, bits)
    elif symmetric:
        s = (torch.maximum(mn.abs(), mx) / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    else:
        s = ((mx - mn) / float(qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    z = torch.zeros_like(s) if symmetric else _round_ste((qmin - mn / s).clamp(qmin, qmax))
    q = _round_ste((Wg / s[..., None] + r.v.reshape(Wg.shape) + z[..., None]).clamp(qmin, qmax))
    return ((q - z[..., None]) * s[..., None]).reshape(out, n)


@torch.no_grad()
def final_weights(W: Tensor, r: Rounding, *, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: torch.dtype, full_range: bool = False) -> QuantResult:
    """The integers, scales and zero points `r` stands for, in compressed-tensors' convention (as
    `rtn_quantize`, which this equals at the start v = 0, alpha = beta = 1, unless full range)."""
    out, n = W.shape
    gs = n if group_size == -1 else group_size
    qmin, qmax = _qrange(bits)
    Wg, mn, mx = _ranges(W, r, gs)
    if symmetric and full_range:
        stored = full_range_scale(mn.clamp(max=0.0), mx.clamp(min=0.0), bits).to(scale_dtype)
        scale = torch.where(stored == 0, torch.full_like(stored, torch.finfo(scale_dtype).eps), stored)
        s32, zero = scale.to(Wg.dtype), torch.zeros_like(mn)
    else:
        scale, s32, zero = _params(mn, mx, bits, symmetric, scale_dtype)
    q = (Wg / s32[..., None] + r.v.reshape(Wg.shape) + zero[..., None]).clamp_(qmin, qmax).round_()
    q8, zero8 = q.reshape(out, n).to(torch.int8), zero.to(torch.int8)
    weight = dequantize_groups(q8, scale, zero8, None, gs, W.dtype)
    return QuantResult(q=q8, scale=scale, zero=zero8, g_idx=None, weight=weight, loss=0.0)


@torch.no_grad()
def signed_step(r: Rounding, lr: float) -> None:
    """One signed-gradient descent step, then the parameters back into their ranges."""
    for t in r.tensors():
        if t.grad is not None:
            t.sub_(lr * t.grad.sign())
            t.grad = None
    r.v.clamp_(-0.5, 0.5)
    r.alpha.clamp_(0.5, 1.0)
    r.beta.clamp_(0.5, 1.0)


# ---------------------------------------------------------------- one decoder layer


def _swap_weights(lins: dict[str, Any], weights: dict[str, Tensor]) -> None:
    """Make each Linear compute with the given tensor (a graph node while training) as its weight."""
    for name, lin in lins.items():
        if isinstance(lin._parameters.get("weight"), nn.Parameter):
            del lin._parameters["weight"]
        lin.weight = weights[name]  # type: ignore[assignment]  # a tensor, not a Parameter, on purpose


def _objective(layer: nn.Module, inputs: LayerInputs, targets: list[Tensor]) -> float:
    with torch.no_grad():
        total = sum(float((layer_output(layer(h, **kw)).float() - y.float()).pow(2).sum())
                    for h, kw, y in zip(inputs.hidden, inputs.kwargs, targets))
    return total / sum(y.numel() for y in targets)


def learn_layer(layer: nn.Module, formats: dict[str, QuantFormat], inputs: LayerInputs,
                targets: list[Tensor], cfg: AutoRoundConfig, scale_dtype: torch.dtype, gen: torch.Generator
                ) -> tuple[dict[str, QuantResult], dict[str, Any]]:
    """Learn the rounding of the Linears of `layer` named in `formats` (memory names -> their grid) so that
    the layer on `inputs` reproduces `targets`; leaves the layer computing with the chosen quantized
    weights. Returns each Linear's QuantResult and notes (objective at the start and the end, whether the
    learned parameters won)."""
    names = list(formats)
    lins: dict[str, Any] = {n: layer.get_submodule(n) for n in names}
    W0 = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    groups = {n: formats[n].group_for(w.shape[1]) or -1 for n, w in W0.items()}
    rounding = {n: Rounding.start(W0[n], groups[n]) for n in names}
    requires = {p: p.requires_grad for p in layer.parameters()}
    for p in requires:
        p.requires_grad_(False)

    def exact(r: dict[str, Rounding]) -> dict[str, QuantResult]:
        return {n: final_weights(W0[n], r[n], bits=formats[n].bits, group_size=groups[n],
                                 symmetric=formats[n].symmetric, scale_dtype=scale_dtype,
                                 full_range=cfg.full_range) for n in names}

    def objective(results: dict[str, QuantResult]) -> float:
        _swap_weights(lins, {n: res.weight for n, res in results.items()})
        return _objective(layer, inputs, targets)

    started = time.perf_counter()
    start = exact(rounding)
    start_loss = objective(start)
    lr0 = cfg.lr or 1.0 / cfg.iters
    batches = len(inputs.hidden)
    try:
        for r in rounding.values():
            for x in r.tensors():
                x.requires_grad_(True)
        for step in range(cfg.iters):
            b = int(torch.randint(batches, (1,), generator=gen))
            _swap_weights(lins, {n: fake_quant(W0[n], rounding[n], bits=formats[n].bits, group_size=groups[n],
                                               symmetric=formats[n].symmetric, full_range=cfg.full_range
                                               ).to(W0[n].dtype) for n in names})
            out = layer_output(layer(inputs.hidden[b], **inputs.kwargs[b]))
            loss = (out.float() - targets[b].float()).pow(2).mean()
            loss.backward()
            lr = lr0 * (1 - step / cfg.iters)
            for r in rounding.values():
                signed_step(r, lr)
    finally:
        for r in rounding.values():
            for x in r.tensors():
                x.requires_grad_(False)
    learned = exact(rounding)
    learned_loss = objective(learned)
    chosen = learned if learned_loss < start_loss else start
    for n, lin in lins.items():
        del lin.weight
        lin.weight = nn.Parameter(chosen[n].weight.contiguous(), requires_grad=False)  # type: ignore[assignment]
    for p, flag in requires.items():
        p.requires_grad_(flag)
    notes = {"objective_rtn": float(f"{start_loss:.6g}"), "objective": float(f"{min(start_loss, learned_loss):.6g}"),
             "learned_kept": learned_loss < start_loss, "seconds_training": round(time.perf_counter() - started, 3)}
    return chosen, notes


def stack(results: list[QuantResult]) -> QuantResult:
    """Linears sharing an input, as one matrix with their rows stacked (how gptq encodes groups)."""
    return QuantResult(q=torch.cat([r.q for r in results]), scale=torch.cat([r.scale for r in results]),
                       zero=torch.cat([r.zero for r in results]), g_idx=None,
                       weight=torch.cat([r.weight for r in results]), loss=0.0)


def learn(layer: nn.Module, index: int, adapter: Any, targets: list[Any], inputs: LayerInputs,
          outputs: list[Tensor], cfg: AutoRoundConfig, fmt: QuantFormat, scale_dtype: torch.dtype, seed: int
          ) -> tuple[dict[tuple[str, ...], QuantResult], dict[str, Any]]:
    """The gptq stage's hook for one decoder layer: every target group's learned QuantResult (rows of the
    group's Linears stacked) and the layer's notes."""
    formats = {n: fmt.for_target(adapter, f"model.layers.{index}.", t) for t in targets for n in t.names}
    results, notes = learn_layer(layer, formats, inputs, outputs, cfg, scale_dtype,
                                 torch.Generator().manual_seed(seed + index))
    return {t.names: stack([results[n] for n in t.names]) for t in targets}, notes


def plan(state: PlanState, cfg: AutoRoundConfig) -> PlanState:
    if state.adapter.is_moe:
        raise PlanError("method", f"{state.config.model_type}: autoround learns the rounding of dense Linears; "
                                  "MoE experts are fused parameters: quantize MoE models with gptq or rtn")
    from .gptq import plan as quant_plan

    return quant_plan(state, cfg)


def run(ctx: Any, cfg: AutoRoundConfig) -> Any:
    from .gptq import run as quant_run

    return quant_run(ctx, cfg, learn=learn)
