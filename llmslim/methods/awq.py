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
with the smallest error wins, Q being round-to-nearest on exactly the grid the following quantization stage
starts from: bits, group size, symmetry, observer, per-channel fallback, autoround's full-range scales and
`ignore` (Grid; fields left out of the awq stage are taken from that stage at parsing, and the plan refuses
a pair that differs in any). The error (`objective`):
- linear: ||Q(W s)(x / s) - W x||^2 over the mapping's Linears' outputs (q/k/v stacked, gate/up stacked);
- module (AutoAWQ's and llm-compressor's): ||B_Q(x) - B(x)||^2 at the output of the block the Linears
  belong to, B_Q being the block with Q(W s) / s in place of W: q/k/v through the whole self-attention
  (softmax, o_proj in full precision), gate/up through the whole MLP (activation, product, down_proj).
  Errors that the block damps (a key error softmax ignores, a gate error where the product is small)
  count less; the block runs once per candidate on a sample of whole sequences (`tokens`).
v -> o and up -> down are measured at their Linear's output either way (the Linear is the block).
s = 1 being a candidate, awq never ends worse than plain rtn on its objective.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import Adapter
from ..faults import crash_point
from ..layerstore import done_layers, layer_file, load_layer, save_layer, write_export
from ..layerwise import forward_layer, layer_output, walk
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


def candidates(x_mean: Tensor, w_mean: Tensor | None, grid: int) -> Iterator[tuple[float | None, Tensor]]:
    """The scales tried, in order: (None, s = 1), then (a, candidate_scales(x_mean, w_mean, a)) for a in
    0, 1/grid, ..., (grid-1)/grid."""
    yield None, torch.ones_like(x_mean)
    for i in range(grid):
        yield i / grid, candidate_scales(x_mean, w_mean, i / grid)


@torch.no_grad()
def search(x_mean: Tensor, W: Tensor, quantize: Callable[[Tensor], Tensor], error: Callable[[Tensor], float], *,
           grid: int = 20, duo_scaling: bool = True, group_size: int = -1) -> ScaleSearch:
    """The candidate scale s [in] (`candidates`) for which error(Q(W s) / s) is smallest: `error` takes the
    dequantized weight [out, in] (the mapping's Linears stacked by rows) the Linears would compute with on
    their unscaled inputs x, i.e. Q(W s)(x / s) = (Q(W s) / s) x; x_mean = mean|x| [in]. The first
    candidate wins ties, so s = 1 (plain rtn) unless scaling strictly helps."""
    W = W.float()
    w_mean = weight_profile(W, group_size) if duo_scaling else None
    best: ScaleSearch | None = None
    for alpha, s in candidates(x_mean.float(), w_mean, grid):
        e = error(quantize(W * s) / s)
        if best is None:
            best = ScaleSearch(s, alpha, e, e)
        elif e < best.error:
            best = ScaleSearch(s, alpha, e, best.error_unscaled)
    assert best is not None
    return best


@torch.no_grad()
def search_scale(x: Tensor, W: Tensor, quantize: Callable[[Tensor], Tensor], *, grid: int = 20,
                 duo_scaling: bool = True, group_size: int = -1) -> ScaleSearch:
    """The `linear` objective: the scale s [in] minimising mean ||Q(W s)(x / s) - W x||^2 for inputs x [T, in]
    and a weight W [out, in] (the mapping's Linears stacked by rows); `quantize` maps a weight to its
    dequantized grid values. s = 1 is always a candidate. Float32 throughout."""
    x, W = x.float(), W.float()
    y = x @ W.T

    def error(Wq: Tensor) -> float:
        return float((x @ Wq.T - y).pow(2).mean())

    return search(x.abs().mean(0), W, quantize, error, grid=grid, duo_scaling=duo_scaling, group_size=group_size)


Call = tuple[tuple, dict[str, Any]]  # a module's positional and keyword arguments, as it was called


def module_error(parent: nn.Module, linears: list[nn.Linear], calls: list[Call]) -> Callable[[Tensor], float]:
    """The `module` objective: error(W') = mean squared difference between `parent`'s output with the
    `linears`' weights replaced by W' (their rows stacked, [out, in]) and its output as it is now, over the
    recorded `calls`. Everything else in `parent` (attention, o_proj, the activation, down_proj) stays as it
    is, so the error is measured where the block hands its result to the residual stream. The weights are
    restored after each evaluation."""
    with torch.no_grad():
        reference = [layer_output(parent(*a, **kw)) for a, kw in calls]
    rows = [int(lin.out_features) for lin in linears]

    @torch.no_grad()
    def error(Wq: Tensor) -> float:
        originals = [lin.weight.data for lin in linears]
        total, count = 0.0, 0
        try:
            for lin, w in zip(linears, Wq.split(rows)):
                lin.weight.data = w.to(lin.weight.dtype)
            for (a, kw), ref in zip(calls, reference):
                total += float((layer_output(parent(*a, **kw)).float() - ref.float()).pow(2).sum())
                count += ref.numel()
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data = w
        return total / max(1, count)

    return error


# ---------------------------------------------------------------- folding into the layer


@dataclass(frozen=True)
class Mapping:
    """Linears sharing one input (names relative to the decoder layer), what produces that input, and the
    block whose output the `module` objective measures (None: the Linears' own outputs, as `linear`)."""

    name: str
    previous: str  # a norm (weight / s) or a Linear (rows / s)
    linears: tuple[str, ...]
    block: str | None = None


def mappings(layer: nn.Module, adapter: Adapter) -> list[Mapping]:
    out = [Mapping("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "self_attn")]
    v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
    if v.out_features == o.in_features:  # type: ignore[operator]  # GQA: one v channel feeds several o inputs
        out.append(Mapping("o", "self_attn.v_proj", ("self_attn.o_proj",)))
    out.append(Mapping("gate_up", adapter.arch.mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
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


def _rows(x: Any, rows: Tensor, batch: int) -> Any:
    """`x` (tensors in tuples, lists, dicts) restricted to the sequences `rows` of a batch of `batch`: a
    tensor of 2 or more dims whose first is the batch is indexed (hidden states, masks, per-sequence
    positions); anything else (shared position embeddings [1, S, d], scalars) is kept."""
    if isinstance(x, Tensor):
        return x[rows.to(x.device)] if x.dim() >= 2 and x.shape[0] == batch else x
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(v, rows, batch) for v in x)
    if isinstance(x, dict):
        return {k: _rows(v, rows, batch) for k, v in x.items()}
    return x


def _hidden(call: Call) -> Tensor:
    """The hidden states a block was called with (attention takes them by keyword, the MLP by position)."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


class _Inputs:
    """Pre-hooks recording, in one pass of the layer, what each mapping's search needs. `linear` objective: a
    seeded sample of the input tokens of its Linears ([T, in], `share` of them). `module` objective: the
    calls of its block (hidden states and keyword arguments: mask, position embeddings) restricted to a
    seeded sample of whole sequences (`share` of them; attention mixes a sequence's tokens, so they cannot
    be sampled one by one). `batches`: the calibration batch sizes, in the order the layer runs them."""

    def __init__(self, layer: nn.Module, maps: list[Mapping], share: float, gen: torch.Generator,
                 module: bool, batches: list[int]):
        self.x: dict[str, list[Tensor]] = {}
        self.calls: dict[str, list[Call]] = {}
        self._handles = []
        blocks = sorted({m.block for m in maps if module and m.block is not None})
        if blocks:  # the sequences kept, one draw for every block of the layer
            chosen = torch.randperm(sum(batches), generator=gen)[:max(1, math.ceil(share * sum(batches)))]
            starts = [sum(batches[:i]) for i in range(len(batches))]
            self._keep = [torch.sort(chosen[(chosen >= a) & (chosen < a + n)] - a).values
                          for a, n in zip(starts, batches)]
            self._batches = batches
        for block in blocks:
            self.calls[block] = []
            self._handles.append(layer.get_submodule(block).register_forward_pre_hook(
                self._call_hook(block), with_kwargs=True))
        for m in maps:
            if module and m.block is not None:
                continue
            self.x[m.name] = []

            def hook(_mod: Any, args: tuple, name: str = m.name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])
                keep = max(1, math.ceil(share * len(x)))
                idx = torch.randperm(len(x), generator=gen)[:keep].to(x.device)
                self.x[name].append(x[idx].float())
            self._handles.append(layer.get_submodule(m.linears[0]).register_forward_pre_hook(hook))

    def _call_hook(self, block: str) -> Callable[..., None]:
        seen = [0]  # the block runs once per calibration batch, in order

        def hook(_mod: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            i = seen[0]
            seen[0] += 1
            rows, n = self._keep[i], self._batches[i]
            if len(rows) == n:
                self.calls[block].append((args, kwargs))
            elif len(rows):
                self.calls[block].append((_rows(args, rows, n), _rows(kwargs, rows, n)))
        return hook

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
    hooks = _Inputs(layer, maps, min(1.0, cfg.tokens / max(1, inputs.tokens)), gen, cfg.objective == "module",
                    [h.shape[0] for h in inputs.hidden])
    try:
        forward_layer(layer, inputs)  # one pass of the unscaled layer: every mapping's inputs
    finally:
        hooks.remove()
    for m in maps:
        lins: list[Any] = [layer.get_submodule(n) for n in m.linears]
        W = torch.cat([lin.weight.float() for lin in lins])
        gs = _group(cfg, W.shape[1])
        kw = {"grid": cfg.grid, "duo_scaling": cfg.duo_scaling, "group_size": gs}
        if m.name in hooks.x:
            found = search_scale(torch.cat(hooks.x.pop(m.name)), W, grid_quantizer(cfg, gs), **kw)
        else:  # the block's output, on the inputs the block had before any fold of this layer
            assert m.block is not None
            calls = hooks.calls.pop(m.block)
            xs = [_hidden(c).reshape(-1, W.shape[1]) for c in calls]
            x_mean = sum(x.float().abs().sum(0) for x in xs) / sum(len(x) for x in xs)
            error = module_error(layer.get_submodule(m.block), lins, calls)
            found = search(x_mean, W, grid_quantizer(cfg, gs), error, **kw)
            del calls, xs, error
        del W
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
