"""sparsegpt and wanda: weights set to zero, layer by layer, in a dense export.

`core` is the tensor math; this module the stage. It walks the model as gptq does: layer i is read from
disk, calibrated on what the pruned layers 0..i-1 produce (the Hessians H = 2XᵀX/n of all its Linears from
one pass of the unpruned layer; wanda reads only their diagonals, the squared input norms), pruned, written
to its own file in the scratch directory and released. A killed run restores the finished layers from those
files and continues with the next one; the files become the export's shards.

profile: owl first walks the whole model once more, unpruned, for each layer's outlier ratio (on the dense
model's activations, as the paper does): a layer's sparsity must be known before it is pruned, yet the
sparsities are balanced over all layers (their weighted mean is the target), so no layer can be given its
sparsity before every layer's ratio is known, and activations of the pruned layers before it would depend
on the very sparsities being chosen. The profile is written to the scratch directory before any layer is
pruned, and a resumed run reads it back instead of measuring again.

The export is the model's own dense architecture with the zeros in place: vLLM 0.32 refuses any
checkpoint whose sparsity_config has targets, so none is written. What follows keeps the zeros: quantizers
(gptq, rtn, autoround) hold zero weights at exactly zero (PlanState.sparsity tells them), training stages
(distill, qat) keep the pruned Linears' zeros through training (PlanState.sparse_linears names them;
llmslim.training.masks), and the plan refuses stages that change shapes after a sparsity stage.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import replace
from typing import Any

import torch

from ...faults import crash_point
from ...layerstore import done_layers, layer_file, load_layer, save_layer, write_export
from ...layerwise import walk
from ...plan import PlanError, PlanState, meta_model
from ...stage import StageContext, StageResult
from ..configs.sparsity import SparseGptConfig, SparsityFields, WandaConfig
from ..gptq import planned_targets, targets_by_layer
from ..gptq.layer import collect_hessians
from .core import PruneResult, outlier_ratio, owl_sparsities, sparsegpt_prune, wanda_prune

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- plan


def plan(state: PlanState, cfg: SparsityFields) -> PlanState:
    if state.adapter.is_moe:
        raise PlanError("method", f"{state.config.model_type}: sparsity stages prune dense Linears; MoE models are "
                                  "not supported yet")
    model = meta_model(state.config, state.dtype)
    targets = planned_targets(model, state.adapter, cfg.ignore)
    layers = state.adapter.layers(model)
    if isinstance(cfg.sparsity, list) and len(cfg.sparsity) != len(layers):
        raise PlanError("sparsity", f"{len(cfg.sparsity)} per-layer sparsities for a model of {len(layers)} decoder "
                                    "layers; give one per layer, or one fraction")
    nm = cfg.nm()
    if nm is not None:
        for i, ts in enumerate(targets):
            for t in ts:
                for name in t.names:
                    lin: Any = layers[i].get_submodule(name)
                    if lin.in_features % nm[1]:
                        raise PlanError("structure", f"structure {cfg.structure!r} needs input widths divisible by "
                                                     f"{nm[1]}; {name} has {lin.in_features} (leave it dense with "
                                                     f"ignore: [{name.rsplit('.', 1)[-1]}], or use unstructured)")
    if not any(targets):
        raise PlanError("ignore", "ignore leaves no Linear to prune")
    pruned = {f"model.layers.{i}.{name}" for i, ts in enumerate(targets) for t in ts for name in t.names}
    return replace(state, sparsity=cfg.structure, sparse_linears=tuple(sorted(pruned | set(state.sparse_linears))))


# ---------------------------------------------------------------- the stage


def _restore(layer: torch.nn.Module, adapter: Any, index: int, tensors: dict[str, torch.Tensor]) -> None:
    """Load a layer file into the layer in memory (what the export holds, in the export's dtype)."""
    prefix = f"model.layers.{index}."
    state = {k[len(prefix):]: v for k, v in adapter.from_disk(tensors).items()}
    layer.load_state_dict(state)


@torch.no_grad()
def _prune_layer(ctx: StageContext, cfg: SparsityFields, layer: torch.nn.Module, i: int, targets: list[Any],
                 inputs: Any, sparsity: float) -> dict[str, torch.Tensor]:
    started = time.perf_counter()
    hessians = collect_hessians(layer, targets, inputs, ctx.device, 0)
    nm = cfg.nm()
    per_linear: dict[str, dict[str, Any]] = {}
    for t in targets:
        H = hessians.linear[t.names].H  # one input, shared by the group's Linears
        for name in t.names:
            lin: Any = layer.get_submodule(name)
            W = lin.weight.data
            res: PruneResult
            if isinstance(cfg, SparseGptConfig):
                res = sparsegpt_prune(W, H, sparsity, nm, block_size=cfg.block_size, dampening=cfg.dampening)
            else:
                res = wanda_prune(W, H.diagonal(), sparsity, nm, H=H)
            lin.weight.data = res.weight
            per_linear[name] = {"loss": float(f"{res.loss:.6g}")}
    prefix = f"model.layers.{i}."
    tensors = ctx.source.adapter.to_disk({prefix + k: v.to(ctx.dtype) for k, v in layer.state_dict().items()})
    for name in per_linear:  # counted in what is exported
        w = tensors[f"{prefix}{name}.weight"]
        per_linear[name].update(zeros=int((w == 0).sum()), weights=w.numel())
    notes = {"layer": i, "sparsity": sparsity, "linears": per_linear, "seconds": round(time.perf_counter() - started, 3)}
    save_layer(layer_file(ctx.scratch_dir, i), tensors, notes)
    return tensors


def run(ctx: StageContext, cfg: SparsityFields) -> StageResult:
    adapter = ctx.source.adapter
    lazy = ctx.lazy_model()
    targets, _ = targets_by_layer(lazy.model, adapter, cfg.ignore)
    n = len(lazy.layers)
    ctx.scratch_dir.mkdir(parents=True, exist_ok=True)
    done = done_layers(ctx, n, "pruned")
    first_todo = next((i for i in range(n) if i not in done), n)
    kind = "SparseGPT" if isinstance(cfg, SparseGptConfig) else "Wanda"
    profile, owl = _profile(ctx, cfg, lazy, targets)
    what = cfg.structure if cfg.nm() is not None else f"{_target(cfg, profile):.0%}"
    what += " OWL" if owl is not None else ""
    with ctx.progress.track(f"{ctx.stage.label}: {kind} {what}", n) as task:
        for step in walk(lazy, ctx.calibration_inputs(lazy), device=ctx.device):
            i = step.index
            if i < first_todo:
                tensors, _ = load_layer(layer_file(ctx.scratch_dir, i))
            else:
                tensors = _prune_layer(ctx, cfg, step.layer, i, targets[i], step.inputs, profile[i])
                crash_point("sparsity.layer")
            # the next layer calibrates on exactly what the export holds (a resumed run too)
            _restore(step.layer, adapter, i, tensors)
            del tensors
            if i == n - 1:
                step.outputs = []  # nothing reads the last layer's outputs
            task.advance()
    config = copy.deepcopy(ctx.after.config)
    config.dtype = ctx.dtype
    write_export(ctx, config, n)
    layers = [load_layer(layer_file(ctx.scratch_dir, i))[1] for i in range(n)]
    return StageResult(config, _notes(kind, cfg, profile, owl, layers, len(done)))


PROFILE = "owl-profile.json"  # in the scratch directory: the sparsities a resumed run must reuse


def _profile(ctx: StageContext, cfg: SparsityFields, lazy: Any, targets: list[list[Any]]
             ) -> tuple[list[float], dict[str, Any] | None]:
    """Each decoder layer's sparsity, and (profile owl) the record of how they were chosen."""
    n = len(lazy.layers)
    if cfg.profile == "uniform":
        return [cfg.layer_sparsity(i) for i in range(n)], None
    path = ctx.scratch_dir / PROFILE
    if path.is_file():
        owl = json.loads(path.read_text())
        log.info("%s: reusing the OWL profile an earlier run chose", ctx.stage.label)
        return owl["sparsity_per_layer"], owl
    ratios, weights = [], []
    with ctx.progress.track(f"{ctx.stage.label}: OWL outlier ratios (unpruned model)", n) as task:
        for step in walk(lazy, ctx.calibration_inputs(lazy), device=ctx.device):
            i = step.index
            hessians = collect_hessians(step.layer, targets[i], step.inputs, ctx.device, 0)
            pairs = [(step.layer.get_submodule(name).weight.data, hessians.linear[t.names].H.diagonal())
                     for t in targets[i] for name in t.names]
            ratios.append(outlier_ratio(pairs, cfg.owl_threshold))
            weights.append(sum(W.numel() for W, _ in pairs))
            del hessians, pairs
            if i == n - 1:
                step.outputs = []
            task.advance()
    assert isinstance(cfg.sparsity, float)  # the config refuses a list with profile owl
    sparsities = owl_sparsities(ratios, weights, cfg.sparsity, cfg.owl_lambda)
    owl = {"threshold": cfg.owl_threshold, "lambda": cfg.owl_lambda, "outlier_ratio_per_layer": ratios,
           "weights_per_layer": weights, "sparsity_per_layer": sparsities}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(owl))
    os.replace(tmp, path)  # whole or absent: a kill while writing leaves no half profile
    log.info("%s: OWL sparsities per layer %s", ctx.stage.label, ", ".join(f"{s:.3f}" for s in sparsities))
    return sparsities, owl


def _target(cfg: SparsityFields, profile: list[float]) -> float:
    """The stage's declared sparsity: the fraction (owl: the target its profile averages to), or the plain
    mean of a per-layer list."""
    return cfg.sparsity if isinstance(cfg.sparsity, float) else sum(profile) / len(profile)


def _notes(kind: str, cfg: SparsityFields, profile: list[float], owl: dict[str, Any] | None,
           layers: list[dict[str, Any]], resumed: int) -> dict[str, Any]:
    zeros = sum(d["zeros"] for layer in layers for d in layer["linears"].values())
    weights = sum(d["weights"] for layer in layers for d in layer["linears"].values())
    notes: dict[str, Any] = {
        "algorithm": kind, "structure": cfg.structure, "profile": cfg.profile,
        "sparsity_target": float(f"{_target(cfg, profile):.6g}"),
        "sparsity_measured": float(f"{zeros / weights:.6g}"), "zeros": zeros, "weights_pruned_linears": weights,
        "linears_pruned": sum(len(layer["linears"]) for layer in layers), "ignore": list(cfg.ignore),
        "loss_total": float(f"{sum(d['loss'] for layer in layers for d in layer['linears'].values()):.6g}"),
        "export": "dense, zeros in place (no sparsity_config: vLLM 0.32 serves it dense, without speed-up)"}
    if isinstance(cfg.sparsity, list) or owl is not None:
        notes["sparsity_per_layer"] = [float(f"{s:.6g}") for s in profile]
    if owl is not None:
        notes["owl"] = {"threshold": owl["threshold"], "lambda": owl["lambda"],
                        "outlier_ratio_per_layer": [float(f"{d:.6g}") for d in owl["outlier_ratio_per_layer"]]}
    if resumed:
        notes["layers_from_earlier_run"] = resumed
    notes["layers"] = layers
    return notes


__all__ = ["plan", "run", "SparseGptConfig", "WandaConfig"]
