"""One decoder layer through gptq/rtn: collect input Hessians, quantize, encode as checkpoint tensors
(and decode them again, for per-layer resume).

Linears that read the same input (q/k/v; gate/up) share one Hessian and are quantized as one matrix
with their rows stacked: GPTQ treats rows independently (each row's error is compensated within the
row), so this equals quantizing them one by one, with a third of the Hessian work and of the column loop.

MoE experts (fused in memory: gate_up_proj [E, 2I, H], down_proj [E, H, I]) are calibrated on the tokens
the router sends them, seen through a pre-hook on the experts module. An expert that got fewer than
`expert_min_tokens` is calibrated on every token instead (all-experts calibration): its gate/up Hessian
is then the MoE block's input Hessian (accumulated anyway, one [H, H] per layer), and its down Hessian is
accumulated in a second pass over the batches, for those experts only, so that no more than one expert's
activations for one batch exist at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...adapters import Adapter
from ...formats.compressed import QuantScheme, compress_linear, decompress_linear
from ...layerwise import LayerInputs, layer_output
from ..configs.gptq import GptqConfig, QuantFields
from .core import (
    CrossAccumulator,
    HessianAccumulator,
    QuantResult,
    asymmetric_target,
    dequantize_groups,
    gptq_quantize,
    hold_zeros,
    rtn_quantize,
)
from .format import QuantFormat, Target, disk_name, expert_names


def scheme_for(fmt: QuantFormat, in_features: int, act_order: bool) -> QuantScheme:
    """The compressed-tensors scheme of a Linear with this input width. Act-order with groups is recorded
    as "weight" (static groups, no g_idx): the only act-order vLLM 0.32 loads."""
    gs = fmt.group_for(in_features)
    assert gs is not None, f"group_size {fmt.group_size} does not fit width {in_features} (the plan should refuse)"
    return QuantScheme(fmt.bits, gs, fmt.symmetric, fmt.activation_bits,
                       actorder="weight" if act_order and gs != -1 else None)


# ---------------------------------------------------------------- Hessians


def _ordered(args: tuple, kwargs: dict) -> list[Any]:
    return [*args, *kwargs.values()]


@dataclass
class ExpertStats:
    """Calibration of one layer's experts: per-expert Hessians, routed token counts, the block input's H."""

    gate_up: list[HessianAccumulator]
    down: list[HessianAccumulator]
    block_input: HessianAccumulator
    tokens: list[int]
    all_tokens: list[int] = field(default_factory=list)  # experts calibrated on every token


class LayerHessians:
    """Forward pre-hooks on one decoder layer accumulating the Hessian of each target's input."""

    def __init__(self, layer: nn.Module, targets: list[Target], device: torch.device, asymmetric: bool = False):
        self.layer, self.device = layer, device
        self.linear: dict[tuple[str, ...], HessianAccumulator] = {}
        self.cross: dict[tuple[str, ...], CrossAccumulator] = {}  # gptaq: C of each group
        self.reference: dict[tuple[str, ...], Tensor] = {}  # gptaq: this batch's full-precision inputs
        self.experts: ExpertStats | None = None
        self.reference_outputs: list[Tensor] = []
        self.recording = True
        self._handles: list[Any] = []
        for t in targets:
            if t.experts:
                self._hook_experts(layer.get_submodule(t.names[0]))
                continue
            first: Any = layer.get_submodule(t.names[0])  # the group shares this input
            self.linear[t.names] = HessianAccumulator(first.in_features, device=device)
            if asymmetric:
                self.cross[t.names] = CrossAccumulator(first.in_features, device=device)
            self._handles.append(first.register_forward_pre_hook(
                lambda _m, args, names=t.names: self._add(names, args[0])))

    def _add(self, names: tuple[str, ...], x: Tensor) -> None:
        if not self.recording:  # the full-precision pass of gptaq
            return
        if names in self.cross:
            self.cross[names].add(self.reference.pop(names), x)
        self.linear[names].add(x)

    def _hook_experts(self, experts: Any) -> None:
        n, two_i, h = experts.gate_up_proj.shape
        self.experts = stats = ExpertStats(
            [HessianAccumulator(h, device=self.device) for _ in range(n)],
            [HessianAccumulator(two_i // 2, device=self.device) for _ in range(n)],
            HessianAccumulator(h, device=self.device), [0] * n)

        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            x, top_k_index = _ordered(args, kwargs)[:2]  # [T, H], [T, k]
            stats.block_input.add(x)
            for e in range(n):
                tokens = (top_k_index == e).any(dim=-1).nonzero().squeeze(1)
                if tokens.numel() == 0:
                    continue
                stats.tokens[e] += tokens.numel()
                xe = x[tokens]
                stats.gate_up[e].add(xe)
                stats.down[e].add(experts._apply_gate(nn.functional.linear(xe, experts.gate_up_proj[e])))

        self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _LastInputSeen(Exception):
    """Raised by a pre-hook on a dense layer's mlp.down_proj: nothing after it feeds a Hessian."""


def _stop_after(layer: nn.Module, targets: list[Target], hs: LayerHessians) -> Any:
    """In a dense layer, mlp.down_proj is the last Linear and only a residual add follows: once its input
    is in the Hessian the rest of the calibration forward (a fifth of its work) is skipped. Registered
    after the Hessian hooks, so it runs after them."""
    if not targets or targets[-1].names != ("mlp.down_proj",) or any(t.experts for t in targets):
        return None

    def hook(_m: Any, _args: tuple) -> None:
        if hs.recording:
            raise _LastInputSeen

    return layer.get_submodule("mlp.down_proj").register_forward_pre_hook(hook)


def _reference_inputs(layer: nn.Module, targets: list[Target], hidden: Tensor, kwargs: dict
                      ) -> tuple[dict[tuple[str, ...], Tensor], Tensor]:
    """One batch of the full-precision stream through the (still unquantized) layer: each target group's
    input, and the layer's output (the next layer's full-precision input)."""
    seen: dict[tuple[str, ...], Tensor] = {}
    handles = [layer.get_submodule(t.names[0]).register_forward_pre_hook(
        lambda _m, args, names=t.names: seen.__setitem__(names, args[0].detach())) for t in targets]
    try:
        out = layer_output(layer(hidden, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return seen, out


@torch.no_grad()
def collect_hessians(layer: nn.Module, targets: list[Target], inputs: LayerInputs, device: torch.device,
                     min_expert_tokens: int, reference: LayerInputs | None = None) -> LayerHessians:
    """Run the layer on every calibration batch with hooks; then a second pass, only if some expert got
    fewer than `min_expert_tokens`, for those experts' down_proj Hessians over every token.
    `reference` (gptaq, dense layers): the same batches as the full-precision model feeds them to this
    layer; each group's C is accumulated from the token-by-token pairs, and the layer's full-precision
    outputs are kept in `reference_outputs` (the next layer's reference)."""
    hs = LayerHessians(layer, targets, device, asymmetric=reference is not None)
    stop = _stop_after(layer, targets, hs)
    try:
        for b, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            if reference is not None:
                hs.recording = False
                hs.reference, out = _reference_inputs(layer, targets, reference.hidden[b], reference.kwargs[b])
                hs.reference_outputs.append(out)
                hs.recording = True
            try:
                layer(h, **kw)
            except _LastInputSeen:
                pass
    finally:
        hs.remove()
        if stop is not None:
            stop.remove()
    stats = hs.experts
    if stats is None:
        return hs
    starved = [e for e, t in enumerate(stats.tokens) if t < min_expert_tokens]
    if not starved:
        return hs
    target = next(t for t in targets if t.experts)
    experts: Any = layer.get_submodule(target.names[0])
    dense = {e: HessianAccumulator(stats.down[e].in_features, device=device) for e in starved}

    def hook(_m: Any, args: tuple, kwargs: dict) -> None:
        x = _ordered(args, kwargs)[0]
        for e, acc in dense.items():
            acc.add(experts._apply_gate(nn.functional.linear(x, experts.gate_up_proj[e])))

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            layer(h, **kw)
    finally:
        handle.remove()
    for e in starved:
        stats.gate_up[e] = stats.block_input
        stats.down[e] = dense[e]
    stats.all_tokens = starved
    return hs


# ---------------------------------------------------------------- quantization


def quantize_matrix(W: Tensor, H: Tensor | None, cfg: QuantFields, fmt: QuantFormat,
                    scale_dtype: torch.dtype, C: Tensor | None = None, fixed_zero: Tensor | None = None
                    ) -> QuantResult:
    """gptq (with H) or rtn (H None) of W [out, in] on the format's grid, with scales in `scale_dtype` (the
    checkpoint's dtype): the dequantized weight is then exactly what a loader computes, held in W's dtype.
    C (gptaq): GPTQ starts from `asymmetric_target(W, H, C)` instead of W. fixed_zero [out, in] (a sparsity
    mask): those weights come out exactly 0, GPTQ compensating them as rounding errors (`gptq_quantize`)."""
    gs = fmt.group_for(W.shape[1])
    assert gs is not None
    if H is None:
        return rtn_quantize(W, bits=fmt.bits, group_size=gs, symmetric=fmt.symmetric, scale_dtype=scale_dtype,
                            observer=cfg.observer)
    assert isinstance(cfg, GptqConfig)
    if C is not None:
        W = asymmetric_target(W, H, C, cfg.dampening)
    return gptq_quantize(W, H, bits=fmt.bits, group_size=gs, symmetric=fmt.symmetric, act_order=cfg.act_order,
                         dampening=cfg.dampening, block_size=cfg.block_size, static_groups=True,
                         scale_dtype=scale_dtype, observer=cfg.observer, fixed_zero=fixed_zero)


def _rows(res: QuantResult, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return res.q[lo:hi], res.scale[lo:hi], res.zero[lo:hi], res.weight[lo:hi]


@dataclass
class LayerResult:
    """A quantized layer: its checkpoint tensors (all of them, quantized or not) and what to report."""

    tensors: dict[str, Tensor]
    notes: dict[str, Any]


@torch.no_grad()
def quantize_layer(layer: nn.Module, index: int, adapter: Adapter, targets: list[Target], cfg: QuantFields,
                   fmt: QuantFormat, hessians: LayerHessians | None, dtype: torch.dtype,
                   solved: dict[tuple[str, ...], QuantResult] | None = None, keep_zeros: bool = False
                   ) -> LayerResult:
    """Quantize every target of decoder layer `index` in place (weights replaced by their dequantized
    values, so the layer computes what the export will) and encode the layer for the checkpoint, in
    `dtype` (the layer itself may be held in a wider compute dtype). `solved`: the results of dense
    target groups already quantized elsewhere (autoround), only encoded here. keep_zeros (after a sparsity
    stage): the dense Linears' zero weights stay exactly zero, counted before and after in the notes."""
    prefix = f"model.layers.{index}."
    act_order = bool(getattr(cfg, "act_order", False))
    out: dict[str, Tensor] = {}
    losses: dict[str, float] = {}
    done: set[str] = set()  # memory names of the parameters replaced by compressed tensors
    notes: dict[str, Any] = {"layer": index}
    all_fmt = fmt
    for t in targets:
        fmt = all_fmt.for_target(adapter, prefix, t)
        if t.experts:
            experts: Any = layer.get_submodule(t.names[0])
            stats = hessians.experts if hessians is not None else None
            gu, dn = experts.gate_up_proj.data, experts.down_proj.data  # [E, 2I, H], [E, H, I]
            width = dn.shape[2]
            loss = 0.0
            for e, (gate, up, down) in enumerate(expert_names(adapter, prefix, gu.shape[0])):
                res = quantize_matrix(gu[e], stats.gate_up[e].H if stats else None, cfg, fmt, dtype)
                gu[e] = res.weight
                scheme = scheme_for(fmt, gu.shape[2], act_order)
                for name, lo, hi in ((gate, 0, width), (up, width, 2 * width)):
                    q, s, z, _ = _rows(res, lo, hi)
                    out.update(compress_linear(name, q, s, z, None, scheme, dtype=dtype))
                res_d = quantize_matrix(dn[e], stats.down[e].H if stats else None, cfg, fmt, dtype)
                dn[e] = res_d.weight
                out.update(compress_linear(down, res_d.q, res_d.scale, res_d.zero, None,
                                           scheme_for(fmt, width, act_order), dtype=dtype))
                loss += res.loss + res_d.loss
            losses[t.names[0]] = loss
            done.update(f"{t.names[0]}.{p}" for p in ("gate_up_proj", "down_proj"))
            if stats is not None:
                notes["expert_tokens"] = list(stats.tokens)
                if stats.all_tokens:
                    notes["experts_calibrated_on_all_tokens"] = list(stats.all_tokens)
            continue
        lins: list[Any] = [layer.get_submodule(n) for n in t.names]
        W = torch.cat([lin.weight.data for lin in lins])  # rows stacked: one matrix per shared input
        cross = hessians.cross.get(t.names) if hessians is not None else None
        zeros = W == 0 if keep_zeros else None
        res = solved[t.names] if solved is not None else quantize_matrix(
            W, hessians.linear[t.names].H if hessians is not None else None, cfg, fmt, dtype,
            cross.C if cross is not None else None, zeros)
        if zeros is not None:  # rtn and learned rounding keep them too (gptq already has)
            gs = fmt.group_for(W.shape[1])
            res = hold_zeros(res, zeros, W.shape[1] if gs in (None, -1) else gs)
            counts = notes.setdefault("zeros", [0, 0, 0, 0])  # before, kept, after (rounding adds some), weights
            counts[0] += int(zeros.sum())
            counts[1] += int((res.weight[zeros] == 0).sum())
            counts[2] += int((res.weight == 0).sum())
            counts[3] += W.numel()
        scheme = scheme_for(fmt, W.shape[1], act_order)
        lo = 0
        for name, lin in zip(t.names, lins):
            hi = lo + lin.out_features
            q, s, z, w = _rows(res, lo, hi)
            lin.weight.data = w.contiguous()
            out.update(compress_linear(disk_name(adapter, prefix, name), q, s, z, None, scheme, dtype=dtype))
            done.add(f"{name}.weight")
            lo = hi
        losses["+".join([t.names[0]] + [n.rsplit(".", 1)[-1] for n in t.names[1:]])] = res.loss
    rest = {prefix + k: v.to(dtype) for k, v in layer.state_dict().items() if k not in done}
    out.update(adapter.to_disk(rest))
    if hessians is not None:
        notes["loss"] = {k: float(f"{v:.6g}") for k, v in losses.items()}
    return LayerResult(out, notes)


@torch.no_grad()
def restore_layer(layer: nn.Module, index: int, adapter: Adapter, targets: list[Target], fmt: QuantFormat,
                  act_order: bool, tensors: dict[str, Tensor]) -> None:
    """Put the quantized weights saved for layer `index` back into `layer` (bit for bit what
    `quantize_layer` left there), so that a resumed run continues from the same activations."""
    prefix = f"model.layers.{index}."

    def weight(tf: QuantFormat, name: str, in_features: int, dtype: torch.dtype) -> Tensor:
        scheme = scheme_for(tf, in_features, act_order)
        q, scale, zero = decompress_linear(name, tensors, scheme)
        return dequantize_groups(q, scale, zero, None, scheme.group_size if scheme.group_size != -1 else in_features,
                                 dtype)

    for t in targets:
        tf = fmt.for_target(adapter, prefix, t)
        if t.experts:
            experts: Any = layer.get_submodule(t.names[0])
            gu, dn = experts.gate_up_proj.data, experts.down_proj.data
            h, width = gu.shape[2], dn.shape[2]
            for e, (gate, up, down) in enumerate(expert_names(adapter, prefix, gu.shape[0])):
                gu[e] = torch.cat([weight(tf, gate, h, gu.dtype), weight(tf, up, h, gu.dtype)])
                dn[e] = weight(tf, down, width, dn.dtype)
            continue
        for name in t.names:
            lin: Any = layer.get_submodule(name)
            lin.weight.data = weight(tf, disk_name(adapter, prefix, name), lin.in_features, lin.weight.dtype)
