"""prune_experts and set_topk: change which and how many experts an MoE model (Mixtral, Qwen2-MoE,
Qwen3-MoE) has and uses.

prune_experts keeps `keep` experts in every MoE layer (vLLM builds every layer with one expert count),
ranked per layer on calibration tokens, one decoder layer in memory at a time (layer-sequential: each
layer is measured on what the pruned layers before it produce), resumable per layer:
- frequency: share of tokens whose top-k holds the expert;
- gate_weight: mean router probability of the expert over all tokens;
- reap: mean over the expert's routed tokens of routing weight x |expert output| (REAP's saliency);
- random: seeded baseline (no data).
The experts' weights and the router's rows go together; num_experts_per_tok must stay <= keep. With
`norm_topk_prob: false` (Qwen's default) the softmax now runs over fewer experts, so the kept experts'
weights grow a little: a following `distill` stage recovers what that and the removal cost.

set_topk changes num_experts_per_tok (and for the Qwen families optionally norm_topk_prob; Mixtral always
normalises the top-k weights, so it has no such switch); the weights are copied unchanged.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..adapters import layer_of
from ..faults import crash_point
from ..layerstore import done_layers, layer_file, load_layer, save_layer, write_export
from ..layerwise import forward_layer, walk
from ..plan import PlanError, PlanState
from ..stage import StageContext, StageResult
from . import importance as imp
from . import routing
from .configs.experts import PruneExpertsConfig, SetTopkConfig
from .moefy import routing_notes

log = logging.getLogger(__name__)


def _need_moe(state: PlanState, method: str, field: str) -> Any:
    moe = state.adapter.arch.moe
    if moe is None:
        hint = "moefy turns a dense model into MoE" if state.adapter.arch.no_moe_target is None else \
            "moefy cannot convert this family"
        raise PlanError(field, f"{method} needs an MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE); this model is "
                               f"'{state.config.model_type}', which is dense ({hint})")
    return moe


def kept_count(state: PlanState, cfg: PruneExpertsConfig) -> int:
    s = state.shape
    field = "keep" if cfg.keep is not None else "ratio"
    keep = cfg.keep if cfg.keep is not None else imp.kept_from_ratio(s.experts, cfg.ratio or 0.0)
    if keep >= s.experts:
        raise PlanError(field, f"keeping {keep} of {s.experts} experts removes nothing; keep fewer")
    if keep < s.top_k:
        raise PlanError(field, f"keeping {keep} experts is below num_experts_per_tok ({s.top_k}): every token uses "
                               f"{s.top_k}; keep at least {s.top_k}, or lower top_k first with set_topk")
    return keep


def plan_prune(state: PlanState, cfg: PruneExpertsConfig) -> PlanState:
    moe = _need_moe(state, "prune_experts", "keep" if cfg.keep is not None else "ratio")
    new = copy.deepcopy(state.config)
    setattr(new, moe.experts_field, kept_count(state, cfg))
    return state.with_config(new)


def normalizes(config: Any) -> bool:
    """Whether the top-k weights are divided by their sum (Mixtral: always)."""
    return config.model_type == "mixtral" or bool(getattr(config, "norm_topk_prob", False))


class _Routing:
    """Forward pre-hook on an MoE block: its router's decisions and, for reap, the routed experts' output norms."""

    def __init__(self, block: Any, config: Any, reap: bool):
        self.block, self.reap = block, reap
        self.top_k, self.normalize = config.num_experts_per_tok, normalizes(config)
        self.stats = routing.RoutingStats(block.gate.weight.shape[0])
        self.handle = block.register_forward_pre_hook(self._hook)

    def _hook(self, _m: Any, args: Any) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        logits = nn.functional.linear(x, self.block.gate.weight).float()
        weights = routing.route(logits, self.top_k, self.normalize)
        norms = None
        if self.reap:
            experts = self.block.experts
            norms = torch.zeros_like(weights)
            for e in range(weights.shape[1]):
                tokens = torch.nonzero(weights[:, e] > 0).squeeze(1)
                if tokens.numel():
                    act = experts._apply_gate(nn.functional.linear(x[tokens], experts.gate_up_proj[e]))
                    norms[tokens, e] = nn.functional.linear(act, experts.down_proj[e]).float().norm(dim=-1)
        self.stats.add(logits.cpu(), weights.cpu(), None if norms is None else norms.cpu())


def slice_experts(block: Any, kept: list[int]) -> None:
    """Keep experts `kept` (and the router's rows for them) in an MoE block, in place."""
    idx = torch.tensor(kept, dtype=torch.long, device=block.gate.weight.device)
    experts, gate = block.experts, block.gate
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.data.index_select(0, idx).contiguous(), requires_grad=False)
    experts.down_proj = nn.Parameter(experts.down_proj.data.index_select(0, idx).contiguous(), requires_grad=False)
    gate.weight = nn.Parameter(gate.weight.data.index_select(0, idx).contiguous(), requires_grad=False)
    for obj in (experts, gate):
        if hasattr(obj, "num_experts"):
            obj.num_experts = len(kept)


def run_prune(ctx: StageContext, cfg: PruneExpertsConfig) -> StageResult:
    adapter = ctx.source.adapter
    config = copy.deepcopy(ctx.after.config)
    config.dtype = ctx.dtype
    keep = adapter.shape(config).experts
    lazy = ctx.lazy_model()
    n = len(lazy.layers)
    done = done_layers(ctx, n, "pruned")
    layers: dict[str, Any] = {}
    stats_by_layer: dict[str, Any] = {}

    def finish(i: int, layer: nn.Module, scores: torch.Tensor | None, stats: routing.RoutingStats | None) -> None:
        prefix, file = f"model.layers.{i}.", layer_file(ctx.scratch_dir, i)
        if i in done:
            notes = load_layer(file)[1]
            if notes.get("kept") is not None:
                slice_experts(adapter.mlp(layer), notes["kept"])
        else:
            notes = {}
            if scores is not None:
                kept = imp.top_k(scores, keep)
                slice_experts(adapter.mlp(layer), kept)
                notes = {"kept": kept, "removed": [e for e in range(len(scores)) if e not in kept],
                         "scores": [round(float(s), 6) for s in scores]}
                if stats is not None:
                    notes["routing"] = stats.summary()
            state = {prefix + k: v.to(ctx.dtype) for k, v in layer.state_dict().items()}
            save_layer(file, adapter.to_disk(state), notes)
            crash_point("prune_experts.layer")
        if "routing" in notes:
            stats_by_layer[str(i)] = notes.pop("routing")
        layers[str(i)] = notes

    gen = torch.Generator().manual_seed(ctx.seed)
    with ctx.progress.track(f"{ctx.stage.label}: pruning experts to {keep} ({cfg.criterion})", n) as task:
        if cfg.criterion == "random":
            for i in range(n):
                layer = lazy.materialize(i)
                is_moe = adapter.experts(layer) is not None
                scores = torch.rand(adapter.shape(ctx.before.config).experts, generator=gen) if is_moe else None
                with torch.no_grad():
                    finish(i, layer, scores, None)
                lazy.release(i)
                task.advance()
        else:
            first_todo = next((i for i in range(n) if i not in done), n)
            for step in walk(lazy, ctx.calibration_inputs(lazy), device=ctx.device):
                i, layer = step.index, step.layer
                scores, stats = None, None
                if i >= first_todo and adapter.experts(layer) is not None:
                    hook = _Routing(adapter.mlp(layer), ctx.before.config, reap=cfg.criterion == "reap")
                    try:
                        forward_layer(layer, step.inputs)
                    finally:
                        hook.handle.remove()
                    stats, scores = hook.stats, hook.stats.scores(cfg.criterion)
                with torch.no_grad():
                    finish(i, layer, scores, stats)
                if i == n - 1:
                    step.outputs = []
                task.advance()
    write_export(ctx, config, n)
    s0, s1 = ctx.before.shape, ctx.after.shape
    notes: dict[str, Any] = {"criterion": cfg.criterion, "experts": f"{s0.experts} -> {s1.experts}",
                             "top_k": s1.top_k}
    if stats_by_layer:
        notes["routing"] = routing_notes(stats_by_layer)
    if done:
        notes["layers_from_earlier_run"] = len(done)
    notes["layers"] = layers
    return StageResult(config, notes)


# ---------------------------------------------------------------- set_topk


def plan_topk(state: PlanState, cfg: SetTopkConfig) -> PlanState:
    _need_moe(state, "set_topk", "top_k")
    s = state.shape
    if cfg.top_k > s.experts:
        raise PlanError("top_k", f"top_k {cfg.top_k} is more than the model's {s.experts} experts per layer")
    if cfg.top_k == s.top_k and cfg.norm_topk_prob in (None, normalizes(state.config)):
        raise PlanError("top_k", f"the model already uses top_k {s.top_k}: nothing would change")
    new = copy.deepcopy(state.config)
    new.num_experts_per_tok = cfg.top_k
    if cfg.norm_topk_prob is not None:
        if state.config.model_type == "mixtral":
            if not cfg.norm_topk_prob:
                raise PlanError("norm_topk_prob", "Mixtral always normalises its top-k weights; leave norm_topk_prob "
                                                  "out (or true)")
        else:
            new.norm_topk_prob = cfg.norm_topk_prob
    return state.with_config(new)


def run_topk(ctx: StageContext, cfg: SetTopkConfig) -> StageResult:
    config = copy.deepcopy(ctx.after.config)
    config.dtype = ctx.dtype
    src = ctx.source
    writer = ctx.writer()  # the weights are unchanged: copied layer by layer (never linked to the user's files)
    for i in range(ctx.before.shape.layers):
        writer.add(src.read(src.layer_names(i), ctx.dtype))
    writer.add(src.read([k for k in src.names if layer_of(k) is None], ctx.dtype))
    writer.close(config)
    before, after = ctx.before.config, config
    return StageResult(config, {"top_k": f"{before.num_experts_per_tok} -> {after.num_experts_per_tok}",
                                "normalized_topk_weights": normalizes(after)})
