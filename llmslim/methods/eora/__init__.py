"""eora: low-rank compensation of a quantized model, written as a PEFT LoRA adapter beside it.

`core` is the tensor math; this module the stage. It walks the quantized model (its checkpoint decoded to
dense weights) layer by layer, as gptq does: layer i is calibrated on what the corrected layers 0..i-1
produce. For each quantized Linear: the second moment C = XᵀX/n of its inputs (one pass of the layer for
all its Linears), the residual R = W - Q(W) against the weights before quantization (the input checkpoint
of the quantizing stage, which the runner keeps for this stage), and the correction B·A of `core.eora`,
applied in memory before the layer runs for the next layer's inputs. The quantized base is linked unchanged
into the stage's checkpoint; the corrections go to `eora/` (formats/lora.py). Each finished layer is a
file in the scratch directory: a killed run restores those layers and continues with the next.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from typing import Any

import torch

from ...checkpoint import LazyModel
from ...export import link_or_copy, weight_bytes, weight_files
from ...faults import crash_point
from ...formats.lora import ADAPTER_DIR, write_adapter
from ...layerstore import done_layers, layer_file, load_layer, save_layer
from ...layerwise import forward_layer, walk
from ...plan import PlanError, PlanState, meta_model
from ...stage import StageContext, StageResult
from ..configs.eora import EoraConfig
from ..configs.gptq import matches
from ..gptq import targets_by_layer
from ..gptq.format import QuantFormat, disk_name
from .core import eora

log = logging.getLogger(__name__)


def rank_for(name: str, cfg: EoraConfig) -> int:
    """The rank of Linear `name` (memory name): the first `ranks` key that matches it, else `rank`."""
    return next((r for pattern, r in cfg.ranks.items() if matches(name, pattern)), cfg.rank)


def linears(model: Any, adapter: Any, fmt: QuantFormat) -> list[list[str]]:
    """Per decoder layer, the names (relative to the layer) of the dense Linears the quantizing stage quantized."""
    targets, _ = targets_by_layer(model, adapter, list(fmt.ignore))
    return [[n for t in ts if not t.experts for n in t.names] for ts in targets]


# ---------------------------------------------------------------- plan


def plan(state: PlanState, cfg: EoraConfig) -> PlanState:
    if state.quant is None:
        raise PlanError("method", "eora compensates the rounding error of a quantizing stage before it (gptq, rtn, "
                                  "awq + gptq, autoround, qat with a grid base); no stage before this one quantizes")
    if state.lora_rank is not None:
        raise PlanError("method", "a stage before this one (eora, or qat with merge: false) already wrote the "
                                  "model's LoRA adapter; a model has one adapter")
    if not isinstance(state.quant, QuantFormat):
        raise PlanError("method", f"eora cannot read the quantized format of the stage before ({type(state.quant).__name__})")
    if state.adapter.is_moe:
        raise PlanError("method", f"{state.config.model_type}: eora compensates dense Linears; MoE models are not "
                                  "supported yet")
    model = meta_model(state.config, state.dtype)
    names = linears(model, state.adapter, state.quant)
    layers = state.adapter.layers(model)
    used: set[str] = set()
    for i, layer_names in enumerate(names):
        for n in layer_names:
            full = f"model.layers.{i}.{n}"
            key = next((k for k in cfg.ranks if matches(full, k)), None)
            rank = cfg.rank if key is None else cfg.ranks[key]
            if key is not None:
                used.add(key)
            lin: Any = layers[i].get_submodule(n)
            smallest = min(int(lin.in_features), int(lin.out_features))
            if rank > smallest:
                where = "rank" if key is None else "ranks"
                raise PlanError(where, f"rank {rank} is larger than the smaller dimension of {full} "
                                       f"({lin.out_features} x {lin.in_features}); use a rank of at most {smallest}"
                                       + (f" for it (ranks: {{{n.rsplit('.', 1)[-1]}: ...}})" if key is None else ""))
    unused = [k for k in cfg.ranks if k not in used]
    if unused:
        raise PlanError("ranks", f"{unused[0]!r} matches no quantized Linear; names look like "
                                 "model.layers.0.mlp.down_proj (a suffix such as down_proj also works, or re:REGEX)")
    top = max([cfg.rank, *cfg.ranks.values()])
    return replace(state, lora_rank=top)


# ---------------------------------------------------------------- the stage


@torch.no_grad()
def _second_moments(layer: torch.nn.Module, names: list[str], inputs: Any) -> dict[str, torch.Tensor]:
    """C = XᵀX / n [in, in] (float64) of every named Linear's inputs, from one pass of the layer."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(_module: Any, args: tuple, _output: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        forward_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}


@torch.no_grad()
def _apply(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Q += B·A for every Linear of the layer with a correction (in memory: what serving computes)."""
    for key in [k for k in tensors if k.endswith(".lora_B")]:
        name = key.removesuffix(".lora_B")
        weight = layer.get_submodule(name).weight
        weight += (tensors[key].double() @ tensors[name + ".lora_A"].double()).to(weight.dtype)


@torch.no_grad()
def run(ctx: StageContext, cfg: EoraConfig) -> StageResult:
    fmt = ctx.before.quant
    assert isinstance(fmt, QuantFormat) and ctx.unquantized is not None
    adapter = ctx.source.adapter
    quantized = ctx.lazy_model()  # Q(W), decoded to dense
    original = LazyModel(ctx.unquantized, ctx.compute_dtype or ctx.dtype)  # W, as the quantizing stage read it
    names = linears(quantized.model, adapter, fmt)
    on_disk = set(ctx.source.names)
    n = len(quantized.layers)
    ctx.scratch_dir.mkdir(parents=True, exist_ok=True)
    done = done_layers(ctx, n, "compensated")
    first_todo = next((i for i in range(n) if i not in done), n)
    notes_by_layer: list[dict[str, Any]] = []
    with ctx.progress.track(f"{ctx.stage.label}: EoRA rank {cfg.rank}", n) as task:
        for step in walk(quantized, ctx.calibration_inputs(quantized), device=ctx.device):
            i, layer = step.index, step.layer
            if i < first_todo:
                tensors, notes = load_layer(layer_file(ctx.scratch_dir, i))
            else:
                started = time.perf_counter()
                prefix = f"model.layers.{i}."
                todo = [m for m in names[i] if f"{disk_name(adapter, prefix, m)}.weight_scale" in on_disk]
                moments = _second_moments(layer, todo, step.inputs)
                before = original.materialize(i)
                tensors, per_linear = {}, {}
                for m in todo:
                    q = layer.get_submodule(m).weight
                    residual = before.get_submodule(m).weight.double().to(q.device) - q.double()
                    rank = rank_for(prefix + m, cfg)
                    lr = eora(residual, moments[m], rank)
                    tensors[m + ".lora_B"], tensors[m + ".lora_A"] = lr.B.float().cpu(), lr.A.float().cpu()
                    per_linear[m] = {"rank": rank, "before": float(f"{lr.before:.6g}"), "after": float(f"{lr.after:.6g}")}
                original.release(i)
                notes = {"layer": i, "linears": per_linear, "seconds": round(time.perf_counter() - started, 3)}
                save_layer(layer_file(ctx.scratch_dir, i), tensors, notes)
                crash_point("eora.layer")
            _apply(layer, {k: v.to(layer_device(layer)) for k, v in tensors.items()})
            if i == n - 1:
                step.outputs = []  # nothing reads the last layer's outputs
            notes_by_layer.append(notes)
            task.advance()
    # The base: the quantized checkpoint's files, unchanged (linked); the corrections: the adapter beside it.
    for f in weight_files(ctx.source):
        link_or_copy(f, ctx.out_dir / f.name)
    shutil.copy2(ctx.source.path / "config.json", ctx.out_dir / "config.json")
    pairs = {}
    for i in range(n):
        tensors, _ = load_layer(layer_file(ctx.scratch_dir, i))
        for key in [k for k in tensors if k.endswith(".lora_B")]:
            m = key.removesuffix(".lora_B")
            pairs[f"model.layers.{i}.{m}"] = (tensors[key], tensors[m + ".lora_A"])
    all_linears = [f"model.layers.{i}.{m}" for i, ms in enumerate(names) for m in ms]
    adapter_bytes = write_adapter(ctx.out_dir / ADAPTER_DIR, pairs, ctx.dtype, all_linears)
    config = json.loads((ctx.out_dir / "config.json").read_text())
    return StageResult(config, _notes(cfg, notes_by_layer, adapter_bytes, weight_bytes(ctx.out_dir), len(done)))


def layer_device(layer: torch.nn.Module) -> torch.device:
    return next(layer.parameters()).device


def _notes(cfg: EoraConfig, layers: list[dict[str, Any]], adapter_bytes: int, base_bytes: int,
           resumed: int) -> dict[str, Any]:
    before = sum(d["before"] for layer in layers for d in layer["linears"].values())
    after = sum(d["after"] for layer in layers for d in layer["linears"].values())
    notes: dict[str, Any] = {
        "rank": cfg.rank, "ranks": dict(cfg.ranks), "adapter": ADAPTER_DIR,
        "linears": sum(len(layer["linears"]) for layer in layers),
        "objective_before": float(f"{before:.6g}"), "objective_after": float(f"{after:.6g}"),
        "adapter_bytes": adapter_bytes, "adapter_fraction_of_base": float(f"{adapter_bytes / base_bytes:.4g}"),
    }
    if resumed:
        notes["layers_from_earlier_run"] = resumed
    notes["layers"] = layers
    return notes
