"""awq: activation-aware per-input-channel scaling (Lin et al. 2023, AWQ), ahead of gptq, rtn or autoround.

A Linear y = W x computes the same with W' = W diag(s) on x' = x / s. Quantizing W' instead of W gives the
input channels with large activations (scaled up, s > 1) a finer grid relative to their weights, at the
cost of the quiet ones. The division of x by s is folded into whatever produces x, so the model keeps its
architecture and, unquantized, its function (tested: logits equal within float rounding):
- input_layernorm -> q, k, v      (the norm's weight / s)
- v_proj -> o_proj                (v's rows and bias / s; only when v's width equals o's input, i.e. no GQA)
- post_attention_layernorm -> gate, up   (Gemma 3: pre_feedforward_layernorm, the MLP's input norm)
- up_proj -> down_proj            (up's rows and bias / s; act(gate x) * (up x) is linear in up x)
Gemma's norms compute (1 + weight) x / rms(x): there 1 + weight becomes (1 + weight) / s, and the Linears take
the divisor the stored (16-bit) weight realises, so the fold stays exact where a gain shrinks. Its post-norms
(post_attention_layernorm, post_feedforward_layernorm) act on o_proj's and down_proj's outputs, while the
scales act on their inputs, so they are untouched (Architecture.mlp_norm, Adapter.divide_norm).

The scale of each mapping is searched on calibration inputs of the layer: s = mean|x|^a / mean|W~|^(1-a)
(`duo_scaling`; W~ is |W| normalised per quantization group, as AutoAWQ) or mean|x|^a, normalised to
geometric mean 1, for a in {0, 1/grid, ..., (grid-1)/grid}, and also s = 1 (no scaling); the candidate
with the smallest error ||Q(W s)(x / s) - W x||^2 over the mapping's Linears wins, Q being round-to-nearest
on exactly the grid the following quantization stage starts from: bits, group size, symmetry, observer,
per-channel fallback, autoround's full-range scales and `ignore` (Grid; fields left out of the awq stage are
taken from that stage at parsing, and the plan refuses a pair that differs in any). s = 1 being a
candidate, awq never ends worse than plain rtn on this objective.
A mapping whose Linears the next stage keeps unquantized (`ignore`) is left unscaled: no rounding to trade.

Layer by layer, like gptq: each layer is calibrated on what the scaled layers before it produce (the
same function as the original, up to float rounding), then written to its own file; a killed run
resumes after the last finished layer. The clipping search of the AWQ paper is the following stage's
`observer: mse`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import Adapter
from ..faults import crash_point
from ..layerstore import done_layers, layer_file, load_layer, save_layer, write_export
from ..layerwise import forward_layer, walk
from ..plan import PlanError, PlanState
from ..stage import StageContext, StageResult
from .autoround import Rounding, final_weights
from .configs.awq import AwqConfig
from .configs.gptq import Grid, RtnConfig, matches
from .gptq.core import rtn_quantize

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the search (pure)


def weight_profile(W: Tensor, group_size: int) -> Tensor:
    """mean over rows of |W| normalised by its group's max: [in]. How large each input channel's weights
    are relative to the quantization step they share."""
    out, n = W.shape
    gs = n if group_size == -1 else group_size
    a = W.abs().reshape(out, n // gs, gs)
    a = a / a.amax(-1, keepdim=True).clamp(min=1e-12)
    return a.reshape(out, n).mean(0)


def candidate_scales(x_mean: Tensor, w_mean: Tensor | None, alpha: float) -> Tensor:
    """s = x_mean^alpha [/ w_mean^(1-alpha)], clamped away from 0 and normalised to geometric mean 1
    (sqrt(max * min) = 1, as AWQ), so that folding keeps the weights' magnitudes in range."""
    s = x_mean.clamp(min=1e-4).pow(alpha)
    if w_mean is not None:
        s = s / w_mean.clamp(min=1e-4).pow(1 - alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    scale: Tensor  # [in]
    alpha: float | None  # None: no scaling won
    error: float  # of the winner, mean squared output error
    error_unscaled: float  # of s = 1: plain rtn


@torch.no_grad()
def search_scale(x: Tensor, W: Tensor, quantize: Callable[[Tensor], Tensor], *, grid: int = 20,
                 duo_scaling: bool = True, group_size: int = -1) -> ScaleSearch:
    """The per-input-channel scale s [in] minimising mean ||Q(W s)(x / s) - W x||^2 for inputs x [T, in]
    and a weight W [out, in] (the mapping's Linears stacked by rows); `quantize` maps a weight to its
    dequantized grid values. s = 1 is always a candidate. Float32 throughout."""
    x, W = x.float(), W.float()
    y = x @ W.T
    x_mean = x.abs().mean(0)
    w_mean = weight_profile(W, group_size) if duo_scaling else None

    def error(s: Tensor) -> float:
        return float((x @ (quantize(W * s) / s).T - y).pow(2).mean())

    best = ScaleSearch(torch.ones_like(x_mean), None, 0.0, 0.0)
    best.error = best.error_unscaled = error(best.scale)
    for i in range(grid):
        alpha = i / grid
        s = candidate_scales(x_mean, w_mean, alpha)
        e = error(s)
        if e < best.error:
            best = ScaleSearch(s, alpha, e, best.error_unscaled)
    return best


# ---------------------------------------------------------------- folding into the layer


@dataclass(frozen=True)
class Mapping:
    """Linears sharing one input (names relative to the decoder layer) and what produces that input."""

    name: str
    previous: str  # a norm (weight / s) or a Linear (rows / s)
    linears: tuple[str, ...]


def mappings(layer: nn.Module, adapter: Adapter) -> list[Mapping]:
    out = [Mapping("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
    if v.out_features == o.in_features:  # type: ignore[operator]  # GQA: one v channel feeds several o inputs
        out.append(Mapping("o", "self_attn.v_proj", ("self_attn.o_proj",)))
    out.append(Mapping("gate_up", adapter.arch.mlp_norm, ("mlp.gate_proj", "mlp.up_proj")))
    out.append(Mapping("down", "mlp.up_proj", ("mlp.down_proj",)))
    return out


@torch.no_grad()
def fold(layer: nn.Module, m: Mapping, s: Tensor, adapter: Adapter, dtype: torch.dtype | None = None) -> None:
    """Scale the mapping's Linears' input columns by s and divide what produces their input by s (`dtype`: the
    one the layer is stored in, which Gemma's norm fold needs: Adapter.divide_norm)."""
    prev: Any = layer.get_submodule(m.previous)
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)
    else:  # RMSNorm: y = weight * normalised(x), or (1 + weight) * normalised(x) (Gemma)
        s = adapter.divide_norm(prev, s, dtype)
    for name in m.linears:
        lin: Any = layer.get_submodule(name)
        lin.weight.data = (lin.weight.float() * s).to(lin.weight.dtype)


class _Inputs:
    """Pre-hooks keeping a seeded sample of each mapping's input tokens (at most `limit` per mapping)."""

    def __init__(self, layer: nn.Module, maps: list[Mapping], share: float, gen: torch.Generator):
        self.x: dict[str, list[Tensor]] = {m.name: [] for m in maps}
        self._handles = []
        for m in maps:
            def hook(_mod: Any, args: tuple, name: str = m.name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])
                keep = max(1, math.ceil(share * len(x)))
                idx = torch.randperm(len(x), generator=gen)[:keep].to(x.device)
                self.x[name].append(x[idx].float())
            self._handles.append(layer.get_submodule(m.linears[0]).register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def scale_layer(layer: nn.Module, inputs: Any, cfg: AwqConfig, gen: torch.Generator, adapter: Adapter,
                prefix: str = "", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Search and fold every mapping's scale in one decoder layer (`prefix`: its name in the model, for
    `ignore`); returns the layer's notes."""
    notes: dict[str, Any] = {}
    maps = []
    for m in mappings(layer, adapter):
        # the plan refuses ignoring part of a mapping (q/k/v, gate/up share one input): one name decides
        if any(matches(prefix + m.linears[0], p) for p in cfg.ignore):
            notes[m.name] = {"alpha": None, "error": 0.0, "error_unscaled": 0.0, "ignored": True}
        else:
            maps.append(m)
    if not maps:
        return notes
    hooks = _Inputs(layer, maps, min(1.0, cfg.tokens / max(1, inputs.tokens)), gen)
    try:
        forward_layer(layer, inputs)  # one pass of the unscaled layer: every mapping's inputs
    finally:
        hooks.remove()
    for m in maps:
        x = torch.cat(hooks.x.pop(m.name))
        lins: list[Any] = [layer.get_submodule(n) for n in m.linears]
        W = torch.cat([lin.weight.float() for lin in lins])
        gs = _group(cfg, W.shape[1])

        found = search_scale(x, W, grid_quantizer(cfg, gs), grid=cfg.grid, duo_scaling=cfg.duo_scaling, group_size=gs)
        del x, W
        if found.alpha is not None:
            fold(layer, m, found.scale.to(next(layer.parameters()).device), adapter, dtype)
        notes[m.name] = {"alpha": found.alpha, "error": float(f"{found.error:.6g}"),
                         "error_unscaled": float(f"{found.error_unscaled:.6g}")}
    return notes


def grid_quantizer(cfg: AwqConfig, group_size: int) -> Callable[[Tensor], Tensor]:
    """Weight -> its round-to-nearest dequantized values on the grid of `cfg` (what the following stage
    starts from: gptq/rtn's grid with its observer, or autoround's full-range one), float32 scales."""
    if cfg.symmetric and cfg.full_range:
        def full_range(w: Tensor) -> Tensor:
            return final_weights(w, Rounding.start(w, group_size), bits=cfg.bits, group_size=group_size,
                                 symmetric=True, scale_dtype=torch.float32, full_range=True).weight
        return full_range

    def half_range(w: Tensor) -> Tensor:
        return rtn_quantize(w, bits=cfg.bits, group_size=group_size, symmetric=cfg.symmetric,
                            observer=cfg.observer).weight
    return half_range


def _group(cfg: AwqConfig, width: int) -> int:
    if cfg.group_size == -1 or width % cfg.group_size == 0:
        return cfg.group_size
    return -1  # per_channel_fallback (the plan refuses the recipe otherwise)


# ---------------------------------------------------------------- plan and stage


def plan(state: PlanState, cfg: AwqConfig) -> PlanState:
    if state.adapter.is_moe:
        raise PlanError("method", f"{state.config.model_type}: awq scales dense Linears; MoE experts are fused "
                                "parameters it does not handle yet: quantize MoE models with gptq or rtn")
    grid = RtnConfig(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
                     per_channel_fallback=cfg.per_channel_fallback, ignore=cfg.ignore)
    from .gptq import plan as quant_plan

    quant_plan(replace(state, awq_grid=None), grid)  # the same width checks as the quantization stage (group_size must fit)
    return replace(state, awq_grid=Grid.of(cfg))


def run(ctx: StageContext, cfg: AwqConfig) -> StageResult:
    config = copy.deepcopy(ctx.after.config)
    config.dtype = ctx.dtype
    adapter = ctx.source.adapter
    lazy = ctx.lazy_model()
    n = len(lazy.layers)
    done = done_layers(ctx, n, "scaled")
    layers: dict[str, Any] = {}
    with ctx.progress.track(f"{ctx.stage.label}: AWQ scales for W{cfg.bits} g{cfg.group_size}", n) as task:
        for step in walk(lazy, ctx.calibration_inputs(lazy), device=ctx.device):
            i, layer, prefix = step.index, step.layer, f"model.layers.{step.index}."
            file = layer_file(ctx.scratch_dir, i)
            if i in done:  # bit for bit what the earlier run wrote; the walk re-runs it for the next inputs
                tensors, notes = load_layer(file)
                saved = {k[len(prefix):]: v for k, v in adapter.from_disk(tensors).items()}
                layer.load_state_dict({k: saved[k].to(v.dtype) for k, v in layer.state_dict().items()})
            else:
                notes = scale_layer(layer, step.inputs, cfg, torch.Generator().manual_seed(ctx.seed + i), adapter,
                                    prefix, ctx.dtype)
                for p in layer.parameters():  # what the file holds, so a resumed run continues from the same values
                    p.data = p.data.to(ctx.dtype).to(p.dtype)
                save_layer(file, adapter.to_disk({prefix + k: v.to(ctx.dtype) for k, v in layer.state_dict().items()}),
                           notes)
                crash_point("awq.layer")
            layers[str(i)] = notes
            if i == n - 1:
                step.outputs = []
            task.advance()
    write_export(ctx, config, n)
    gain = [d[m]["error"] / d[m]["error_unscaled"] for d in layers.values() for m in d if d[m]["error_unscaled"] > 0]
    notes_out: dict[str, Any] = {
        "grid": f"W{cfg.bits} g{cfg.group_size}" + ("" if cfg.symmetric else " asymmetric")
                + (" full range" if cfg.symmetric and cfg.full_range else "") + f" {cfg.observer}",
        "median_error_ratio": float(f"{sorted(gain)[len(gain) // 2]:.4g}") if gain else None,
        "layers": layers}
    if done:
        notes_out["layers_from_earlier_run"] = len(done)
    return StageResult(config, notes_out)
