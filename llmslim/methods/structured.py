"""The driver shared by the structured pruning methods (prune_heads, prune_ffn): how a criterion is
measured (one decoder layer at a time on calibration activations, from weights, or from gradients), how
the kept units are chosen, and how each edited layer is streamed to the output checkpoint. A method
supplies a `LayerPruner` (its targets, statistics, weight scores and surgery); this module does the rest.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, layer_of
from ..layerwise import walk
from ..stage import StageContext, StageResult
from . import importance as imp

NOTE_LIMIT = 20_000  # kept indices are listed in the report up to this many numbers per stage


class Collector:
    """Activation statistics of one decoder layer, gathered by forward pre-hooks while the layer runs on
    calibration batches. `batch` holds the current batch's (windows, seq_len), for hooks that see
    flattened [windows * seq_len, ...] tokens."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.batch = (0, 0)

    def hook(self, module: Any, fn: Any) -> None:
        """Call fn(*inputs) before every forward of `module` (keyword inputs follow, in call order)."""
        self.handles.append(module.register_forward_pre_hook(
            lambda _m, args, kwargs: fn(*args, *kwargs.values()), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def scores(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LayerPruner:
    """What one structured method tells the driver about a decoder layer. Scores and targets are keyed
    by part ("attention", "mlp", "experts", "shared_expert"); a score tensor is [units] or, for experts,
    [experts, units] (each expert chooses its own units, all keep the same number)."""

    def __init__(self, adapter: Adapter, config: Any, target: Any):
        self.adapter, self.config, self.target = adapter, config, target

    def targets(self, layer: nn.Module, index: int) -> dict[str, int]:
        """How many units each part of layer `index` keeps."""
        raise NotImplementedError

    def collector(self, layer: nn.Module, index: int) -> Collector:
        """Hooks that measure the activation criterion on this layer."""
        raise NotImplementedError

    def weight_scores(self, layer: nn.Module, index: int, taylor: bool) -> dict[str, torch.Tensor]:
        """magnitude (taylor=False) or first-order Taylor scores (taylor=True; reads `.grad`)."""
        raise NotImplementedError

    def edit(self, layer: nn.Module, kept: dict[str, Any]) -> None:
        """Remove everything but the kept units from the layer, in place."""
        raise NotImplementedError


def slice_linear(lin: Any, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only `rows` (outputs, with the bias) and/or `cols` (inputs) of an nn.Linear, in place."""
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        if getattr(lin, "bias", None) is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, rows.to(w.device)).contiguous(), requires_grad=False)
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    lin.out_features, lin.in_features = w.shape


def unit_scores(p: torch.Tensor, dim: int, taylor: bool) -> torch.Tensor:
    """Per output row (dim=1) or input column (dim=0) of a weight, or per element of a bias: the sum of
    squares (magnitude) or of |grad * w| (taylor), in float64 on the CPU."""
    grad = p.grad
    if p.dim() == 1:
        p, dim = p.unsqueeze(1), 1
        grad = None if grad is None else grad.unsqueeze(1)
    if taylor:
        assert grad is not None, "taylor scores need gradients"
        out = imp.taylor_terms(p, grad, dim)
    else:
        out = imp.row_square_norms(p, dim)
    return out.double().cpu()


def _count(kept: Any) -> int:
    if isinstance(kept, dict):
        return sum(_count(v) for v in kept.values())
    if isinstance(kept, list) and kept and isinstance(kept[0], list):
        return sum(len(r) for r in kept)
    return len(kept)


def _select(scores: torch.Tensor, keep: int) -> list[int] | list[list[int]]:
    if scores.dim() == 1:
        return imp.top_k(scores, keep)
    return [imp.top_k(row, keep) for row in scores]


def _kept_fraction(scores: torch.Tensor, kept: Any) -> float:
    """Share of the total score that the kept units hold (1.0 = nothing of value removed)."""
    total = scores.double().clamp(min=0).sum().item()
    rows = [kept] if scores.dim() == 1 else kept
    flat = scores.double().clamp(min=0).reshape(len(rows), -1)
    held = sum(flat[r, idx].sum().item() for r, idx in enumerate(rows))
    return round(held / total, 6) if total > 0 else 1.0


def accumulate_gradients(model: Any, tokens: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Leave dL/dw in `.grad` of every decoder-layer weight: the mean next-token loss over all windows."""
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers.parameters():
        p.requires_grad_(True)
        p.grad = None
    with torch.enable_grad():
        for batch in tokens.split(batch_size):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * batch.shape[0] / tokens.shape[0]).backward()


def run_structured(ctx: StageContext, criterion: str, pruner: LayerPruner, label: str) -> StageResult:
    """Score, select, edit and write every decoder layer; the other tensors are copied unchanged."""
    src, adapter = ctx.source, ctx.source.adapter
    config = copy.deepcopy(ctx.after.config)  # the planned config; its dtype is set below
    lazy = ctx.lazy_model()
    writer = ctx.writer()
    gen = torch.Generator().manual_seed(ctx.seed)
    kept_by_layer: dict[str, Any] = {}
    kept_fraction: dict[str, dict[str, float]] = {}
    n = len(lazy.layers)

    def finish(index: int, layer: nn.Module, scores: dict[str, torch.Tensor]) -> None:
        if criterion == "random":
            scores = {k: torch.rand(v.shape, generator=gen) for k, v in scores.items()}
        targets = pruner.targets(layer, index)
        kept = {part: _select(scores[part].cpu(), keep) for part, keep in targets.items()}
        kept_by_layer[str(index)] = kept
        kept_fraction[str(index)] = {part: _kept_fraction(scores[part].cpu(), kept[part]) for part in kept}
        pruner.edit(layer, kept)
        prefix = f"model.layers.{index}."
        writer.add_state(adapter, {prefix + k: v.to(ctx.dtype) for k, v in layer.state_dict().items()}, config)

    peak_note = ""
    with ctx.progress.track(f"{ctx.stage.label}: {label} ({criterion})", n) as task:
        if criterion == "activation":
            inputs = ctx.calibration_inputs(lazy)
            for step in walk(lazy, inputs, device=ctx.device):
                col = pruner.collector(step.layer, step.index)
                try:
                    with torch.no_grad():
                        for h, kw in zip(step.inputs.hidden, step.inputs.kwargs):
                            col.batch = (h.shape[0], h.shape[1])
                            step.layer(h, **kw)
                finally:
                    col.remove()
                finish(step.index, step.layer, col.scores())
                task.advance()  # the walk now runs the pruned layer: the next layer sees its outputs
        elif criterion == "taylor":
            model = lazy.materialize_all()
            accumulate_gradients(model, ctx.calibration_tokens(), 8, ctx.device)
            peak_note = "whole model in memory, with gradients (taylor)"
            for i in range(n):
                layer = lazy.layers[i]
                with torch.no_grad():
                    finish(i, layer, pruner.weight_scores(layer, i, taylor=True))
                lazy.release(i)
                task.advance()
        else:
            for i in range(n):
                layer = lazy.materialize(i)
                with torch.no_grad():
                    finish(i, layer, pruner.weight_scores(layer, i, taylor=False))
                lazy.release(i)
                task.advance()
    writer.add(src.read([k for k in src.names if layer_of(k) is None], ctx.dtype))
    config.dtype = ctx.dtype
    writer.close(config)
    count = _count(kept_by_layer)
    notes: dict[str, Any] = {"criterion": criterion, "kept_score_fraction": kept_fraction}
    notes["kept"] = kept_by_layer if count <= NOTE_LIMIT else f"{count} indices (not listed; over {NOTE_LIMIT})"
    return StageResult(config, notes, peak_note)
