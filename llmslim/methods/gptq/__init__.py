"""gptq and rtn: weight quantization into compressed-tensors, vLLM's own checkpoint format.

`core` is the tensor math (no I/O), `layer` what happens to one decoder layer, this module the stage:
- gptq streams the model layer by layer: layer i is read from disk, calibrated on what quantized layers
  0..i-1 produce (layer-sequential: the Hessians of all of layer i's Linears come from one pass of the
  unquantized layer i), quantized, written to its own shard file and released. Host memory
  is one layer plus the calibration activations, whatever the depth.
- rtn is the same walk without data.
- Every finished layer is a file in the stage's scratch directory. A killed run continues from the last
  finished layer: earlier layers are restored from their files (bit for bit the weights the first run
  held) and only re-run to rebuild the activations, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ...adapters import layer_of
from ...faults import crash_point
from ...formats.compressed import QuantScheme, quantization_config_groups
from ...layerstore import done_layers, layer_file, load_layer, save_layer, write_export
from ...layerwise import LayerInputs, run_layer, walk
from ...plan import PlanError, PlanState, meta_model
from ...stage import StageContext, StageResult
from ..configs.gptq import GptqConfig, Grid, QuantFields, matches
from . import mixed
from .format import QuantFormat, Target, disk_name, expert_names, layer_targets, resolve_ignore, target_names
from .layer import collect_hessians, quantize_layer, restore_layer, scheme_for

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- plan


def targets_by_layer(model: Any, adapter: Any, ignore: list[str]) -> tuple[list[list[Target]], set[str]]:
    out, used = [], set()
    for i, layer in enumerate(adapter.layers(model)):
        targets, hit = resolve_ignore(layer_targets(adapter, layer), adapter, f"model.layers.{i}.", ignore)
        out.append(targets)
        used |= hit
    return out, used


def planned_targets(model: Any, adapter: Any, ignore: list[str]) -> list[list[Target]]:
    """targets_by_layer at planning time: an `ignore` pattern that is malformed or matches no Linear is a
    PlanError on the field."""
    try:
        targets, used = targets_by_layer(model, adapter, ignore)
    except ValueError as e:
        raise PlanError("ignore", str(e)) from None
    unused = [p for p in ignore if p not in used and not matches("lm_head", p)]
    if unused:
        raise PlanError("ignore", f"{unused[0]!r} matches no Linear of the model; names look like "
                                  "model.layers.0.self_attn.q_proj or model.layers.0.mlp.down_proj (a suffix such "
                                  "as down_proj also works, or re:REGEX)")
    return targets


def plan(state: PlanState, cfg: QuantFields) -> PlanState:
    fmt = QuantFormat.of(cfg)
    if state.awq_grid is not None:
        _check_awq_pair(state.awq_grid, cfg)
    model = meta_model(state.config, state.dtype)
    adapter = state.adapter
    targets = planned_targets(model, adapter, cfg.ignore)
    _check_groups(fmt, adapter, targets)
    widths: dict[tuple[int, int], list[str]] = {}  # (input width, the group size that does not fit it) -> names
    for i, layer in enumerate(adapter.layers(model)):
        for t in targets[i]:
            tf = fmt.for_target(adapter, f"model.layers.{i}.", t)
            if t.experts:
                experts: Any = layer.get_submodule(t.names[0])
                n_in = {experts.gate_up_proj.shape[2]: "experts.gate_up", experts.down_proj.shape[2]: "experts.down"}
            else:
                n_in = {layer.get_submodule(n).in_features: n for n in t.names}
            for width, name in n_in.items():
                if tf.group_for(width) is None:
                    widths.setdefault((width, tf.group_size), []).append(name.rsplit(".", 1)[-1])
    if widths:
        (width, group_size), names = next(iter(widths.items()))
        raise PlanError("group_size", f"group_size {group_size} does not divide the input width {width} of "
                                      f"{', '.join(sorted(set(names)))}; use a group_size that divides it, -1 (per "
                                      "channel), or per_channel_fallback: true to quantize those Linears per channel")
    if cfg.activation_bits == 8 and any(t.experts for ts in targets for t in ts):
        raise PlanError("activation_bits", "W8A8 int8 experts: transformers 5.19 cannot load int8 MoE experts and "
                                           "vLLM's CPU build has no int8 MoE kernel; add 're:.*experts.*' to ignore "
                                           "to keep the experts in the working dtype, or use weight-only bits")
    if adapter.is_moe and any(adapter.experts(layer) is not None and not any(t.experts for t in targets[i])
                              for i, layer in enumerate(adapter.layers(model))):
        raise PlanError("ignore", "keeping MoE experts unquantized while other Linears are quantized: transformers "
                                  "5.19 then expects packed experts and silently re-initialises them on load; "
                                  "quantize the experts too (weight-only, symmetric)")
    if not cfg.symmetric and any(t.experts for ts in targets for t in ts):
        raise PlanError("symmetric", "asymmetric grids for MoE experts: transformers 5.19 does not read the zero "
                                     "points of quantized experts when it loads them; use symmetric: true, or add "
                                     "'re:.*experts.*' to ignore to keep the experts unquantized")
    if not any(targets):
        raise PlanError("ignore", "ignore leaves no Linear to quantize")
    if getattr(cfg, "gptaq", False) and adapter.is_moe:
        raise PlanError("gptaq", f"{state.config.model_type}: gptaq calibrates dense Linears on paired full-precision "
                                 "and quantized inputs; MoE routes the two streams to different experts: use gptaq: "
                                 "false")
    return replace(state, quant=fmt, awq_grid=None)


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(list(v)) if isinstance(v, tuple) else str(v)


def _check_awq_pair(searched: Grid, cfg: QuantFields) -> None:
    """The awq stage before searched its scales by rounding on `searched`; this stage must round on the same
    grid, or the scales were chosen for errors this stage does not make."""
    for name, what in (("groups", "groups (mixed precision by hand)"), ("mixed", "mixed (automatic mixed precision)")):
        if getattr(cfg, name):
            raise PlanError(name, f"the awq stage before searched its scales on one grid (bits {searched.bits}, "
                                  f"group_size {searched.group_size}) for every Linear; {what} gives some Linears "
                                  f"another: drop awq or {name}")
    field = searched.differs(Grid.of(cfg))
    if field is None:
        return
    ours = _value(getattr(Grid.of(cfg), field))
    theirs = _value(getattr(searched, field))
    if field == "full_range":  # set on autoround only; gptq, rtn and qat have the half-range grid
        hint = f"set full_range: {ours} on the awq stage" + (
            f" (or full_range: {theirs} on this one)" if hasattr(cfg, "full_range") else "")
    else:
        hint = f"set {field}: {ours} on the awq stage, or leave it out there: awq takes the following stage's"
    raise PlanError(field, f"the awq stage before searched its scales with {field} {theirs}; this stage "
                           f"rounds with {field} {ours}: {hint}")


def _check_groups(fmt: QuantFormat, adapter: Any, targets: list[list[Target]]) -> None:
    """Mixed precision: every group pattern matches some Linear, and Linears vLLM fuses share a group."""
    if not fmt.groups:
        return
    used: set[int] = set()
    for i, ts in enumerate(targets):
        prefix = f"model.layers.{i}."
        for t in ts:
            if t.experts:
                module, *parts = target_names(adapter, prefix, t)[0]
                members = [[module, p] for p in parts]
            else:
                members = target_names(adapter, prefix, t)
            found = [fmt.matching(m) for m in members]
            if len(set(found)) > 1:
                raise PlanError("groups", f"groups put {', '.join(m[-1].rsplit('.', 1)[-1] for m in members)} of layer {i} in different "
                                          "precisions; vLLM runs them as one matrix: give them the same group")
            used.update(g for g in found if g is not None)
    for g, (patterns, _, _) in enumerate(fmt.groups):
        if g not in used:
            raise PlanError("groups", f"groups[{g}]: {list(patterns)} matches no quantized Linear (or an earlier group "
                                      "takes all it matches); names look like model.layers.0.mlp.down_proj (a suffix "
                                      "such as down_proj also works, or re:REGEX)")


# ---------------------------------------------------------------- the stage


def config_block(ctx: StageContext, fmt: QuantFormat, act_order: bool, model: Any,
                  targets: list[list[Target]]) -> dict:
    """compressed-tensors' quantization_config for what was quantized: one group targeting every Linear
    when one scheme fits all (as llm-compressor writes it), else one group per scheme with name regexes."""
    adapter = ctx.source.adapter
    schemes: dict[QuantScheme, set[str]] = {}
    quantized: set[str] = set()  # checkpoint names of the quantized dense Linears
    for i, layer in enumerate(adapter.layers(model)):
        prefix = f"model.layers.{i}."
        for t in targets[i]:
            tf = fmt.for_target(adapter, prefix, t)
            if t.experts:
                experts: Any = layer.get_submodule(t.names[0])
                h, width = experts.gate_up_proj.shape[2], experts.down_proj.shape[2]
                for gate, up, down in expert_names(adapter, prefix, experts.gate_up_proj.shape[0]):
                    schemes.setdefault(scheme_for(tf, h, act_order), set()).update((gate, up))
                    schemes.setdefault(scheme_for(tf, width, act_order), set()).add(down)
                continue
            for n in t.names:
                name, lin = disk_name(adapter, prefix, n), layer.get_submodule(n)
                schemes.setdefault(scheme_for(tf, int(lin.in_features), act_order), set()).add(name)  # type: ignore[arg-type]
                quantized.add(name)
    ignore = ["lm_head"]
    for name, module in model.named_modules():  # unquantized Linears, by their checkpoint names
        index = layer_of(name)
        if isinstance(module, torch.nn.Linear) and index is not None:
            disk = disk_name(adapter, f"model.layers.{index}.", name[len(f"model.layers.{index}."):])
            if disk not in quantized:
                ignore.append(disk)
    if len(schemes) == 1:
        return quantization_config_groups([(next(iter(schemes)), ("Linear",))], ignore=ignore)

    def general(name: str) -> str:  # layer and expert numbers generalised, anchored
        return "re:^" + re.sub(r"\\\.(layers|experts)\\\.\d+\\\.", r"\\.\1\\.\\d+\\.", re.escape(name)) + "$"

    # A generalised pattern that two schemes would share (mixed precision by layer) stays exact instead:
    # groups never overlap.
    owners: dict[str, set[QuantScheme]] = {}
    for s, names in schemes.items():
        for n in names:
            owners.setdefault(general(n), set()).add(s)

    def pattern(name: str) -> str:
        g = general(name)
        return g if len(owners[g]) == 1 else "re:^" + re.escape(name) + "$"

    return quantization_config_groups(
        [(s, tuple(sorted({pattern(n) for n in names}))) for s, names in schemes.items()], ignore=ignore)


def run(ctx: StageContext, cfg: QuantFields, learn: Callable[..., Any] | None = None) -> StageResult:
    """gptq and rtn; with `learn` (autoround), each layer's quantized weights come from that function,
    trained towards the full-precision model's outputs of the layer."""
    fmt = ctx.after.quant
    assert isinstance(fmt, QuantFormat)
    calibrate = isinstance(cfg, GptqConfig) or learn is not None
    act_order = bool(getattr(cfg, "act_order", False))
    adapter = ctx.source.adapter
    lazy = ctx.lazy_model()
    targets, _ = targets_by_layer(lazy.model, adapter, cfg.ignore)
    n = len(lazy.layers)
    ctx.scratch_dir.mkdir(parents=True, exist_ok=True)
    allocation = None
    if cfg.mixed is not None:  # decided once (a pass over the unquantized model), kept for a resumed run
        fmt, allocation = mixed.plan_groups(ctx, lazy, targets, fmt, cfg)
    done = done_layers(ctx, n, "quantized")
    resumed = len(done)
    first_todo = next((i for i in range(n) if i not in done), n)
    notes_by_layer: list[dict[str, Any]] = []

    asymmetric = bool(getattr(cfg, "gptaq", False)) or learn is not None
    reference: list[Any] = []  # gptaq: the full-precision model's inputs to the current layer

    def quantize(layer: torch.nn.Module, i: int, inputs: Any) -> dict[str, Any]:
        started = time.perf_counter()
        hessians, solved, learned = None, None, {}
        if learn is not None:
            outputs = run_layer(layer, LayerInputs(reference[0], inputs.kwargs))  # the full-precision layer's
            solved, learned = learn(layer, i, adapter, targets[i], inputs, outputs, cfg, fmt, ctx.dtype, ctx.seed)
            reference[0] = outputs
        elif calibrate:
            assert isinstance(cfg, GptqConfig)
            ref = LayerInputs(reference[0], inputs.kwargs) if asymmetric else None
            hessians = collect_hessians(layer, targets[i], inputs, ctx.device, cfg.expert_min_tokens, ref)
            if asymmetric:
                reference[0] = hessians.reference_outputs
        result = quantize_layer(layer, i, adapter, targets[i], cfg, fmt, hessians, ctx.dtype, solved,
                                keep_zeros=ctx.before.sparsity is not None)
        notes = {**result.notes, **learned, "seconds": round(time.perf_counter() - started, 3)}
        save_layer(layer_file(ctx.scratch_dir, i), result.tensors, notes)
        crash_point("gptq.layer")
        return notes

    kind = "AutoRound" if learn is not None else "GPTQ" if calibrate else "RTN"
    label = f"{ctx.stage.label}: {kind} W{fmt.bits}" + (
        "A8" if fmt.activation_bits else f" g{fmt.group_size}") + (" mixed" if fmt.groups else "")
    with ctx.progress.track(label, n) as task:
        if calibrate and first_todo < n:
            # layer-sequential: each layer sees what the quantized layers before it produce. Layers an
            # earlier run finished are restored from their files and only re-run for their outputs.
            for step in walk(lazy, ctx.calibration_inputs(lazy), device=ctx.device):
                i = step.index
                if asymmetric and i == 0:
                    reference.append(step.inputs.hidden)  # layer 0: both models see the embeddings
                if i < first_todo:
                    if asymmetric:  # the restored layer's full-precision outputs: run it before restoring
                        reference[0] = run_layer(step.layer, LayerInputs(reference[0], step.inputs.kwargs))
                    tensors, notes = load_layer(layer_file(ctx.scratch_dir, i))
                    restore_layer(step.layer, i, adapter, targets[i], fmt, act_order, tensors)
                    del tensors
                else:
                    notes = quantize(step.layer, i, step.inputs)
                if i == n - 1:
                    step.outputs = []  # nothing reads the last layer's outputs
                notes_by_layer.append(notes)
                task.advance()
        else:  # rtn (or a gptq run whose layers are all done): layers are independent
            for i in range(n):
                if i in done:
                    notes_by_layer.append(load_layer(layer_file(ctx.scratch_dir, i))[1])
                else:
                    notes_by_layer.append(quantize(lazy.materialize(i).to(ctx.device), i, None))
                    lazy.release(i)
                task.advance()
    config = copy.deepcopy(ctx.after.config)
    config.dtype = ctx.dtype
    config.quantization_config = config_block(ctx, fmt, act_order, lazy.model, targets)
    write_export(ctx, config, n)
    notes = _notes(fmt, cfg, notes_by_layer, resumed)
    if allocation is not None:
        notes["mixed"] = allocation
    if learn is not None:
        notes["layers_learned_kept"] = sum(bool(d.get("learned_kept")) for d in notes_by_layer)
    return StageResult(config, notes)


def _notes(fmt: QuantFormat, cfg: QuantFields, layers: list[dict[str, Any]], resumed: int) -> dict[str, Any]:
    notes: dict[str, Any] = {
        "scheme": f"W{fmt.bits}A{fmt.activation_bits or 16}", "group_size": fmt.group_size,
        "symmetric": fmt.symmetric, "ignore": list(cfg.ignore)}
    if cfg.groups:
        notes["groups"] = [g.model_dump() for g in cfg.groups]
    if isinstance(cfg, GptqConfig):
        notes.update(act_order=cfg.act_order, dampening=cfg.dampening, gptaq=cfg.gptaq,
                     gptq_loss_total=float(f"{sum(sum(d.get('loss', {}).values()) for d in layers):.6g}"))
        starved = {str(d["layer"]): d["experts_calibrated_on_all_tokens"] for d in layers
                   if d.get("experts_calibrated_on_all_tokens")}
        if starved:
            notes["experts_calibrated_on_all_tokens"] = starved
            log.warning("experts with fewer than %d routed calibration tokens were calibrated on all tokens: %s",
                        cfg.expert_min_tokens, starved)
    counts = [d["zeros"] for d in layers if "zeros" in d]
    if counts:  # after a sparsity stage: its zeros, counted in the quantized Linears before and after
        before, kept, after, weights = (sum(c[k] for c in counts) for k in range(4))
        notes.update(zeros_before=before, zeros_kept=kept, zeros_after=after,
                     sparsity_measured=float(f"{after / weights:.6g}"))
    if resumed:
        notes["layers_from_earlier_run"] = resumed
    notes["layers"] = layers
    return notes
