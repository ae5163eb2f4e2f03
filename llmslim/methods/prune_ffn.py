"""prune_ffn: remove MLP intermediate channels (rows of gate/up, columns of down).

Every layer keeps the same width (one `intermediate_size` in config.json is what vLLM and transformers
build from). MoE models: every expert of every layer keeps the same number of channels, each expert its
own best ones; the target names the experts' width. The other FFN widths of the model shrink by the
same fraction (new expert width / old expert width): Qwen2-MoE's shared expert
(`shared_expert_intermediate_size`) and the dense layers of Qwen-MoE models (`intermediate_size`, where
`mlp_only_layers`/`decoder_sparse_step` leave some). They are rounded the same way and never grow.

Rounding (`multiple_of`, default 64): a width derived from `ratio` (or scaled for the shared expert and
dense layers) is rounded to the nearest multiple of `multiple_of`, an exact half going down, and never
to less than one multiple (never 0). Nearest, because a ratio approximates the size wanted (3/7 written
as 0.4286 of 14336 gives 8191.6: nearest gives 8192, rounding down 8128) and the error stays within
half a multiple either way. An explicit `intermediate_size` is never changed: it must be a multiple of
`multiple_of` (set `multiple_of: 1` to allow any width).

Criteria (score of a channel; the lowest-scoring channels go):
- activation (Minitron): mean |act(gate) * up| over a window's tokens, L2 over windows. Dense MLPs and
  the shared expert: down_proj's input. Experts: act(gate)*up computed per expert from the tokens the
  router sends it; an expert that receives no calibration token falls back to magnitude scores.
- magnitude: L2 norm of the channel's weights (gate row, up row, down column); no data.
- taylor (LLM-Pruner, first order): sum of |dL/dw * w| over the same weights; whole model in memory.
- random: seeded by the recipe's seed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..plan import PlanError, PlanState
from ..stage import StageContext, StageResult
from . import importance as imp
from .configs.prune_ffn import PruneFfnConfig
from .structured import (
    Collector,
    LayerPruner,
    run_structured,
    slice_linear,
    unit_scores,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- plan


def _has_dense_layers(state: PlanState) -> bool:
    return any(not state.adapter.is_moe_layer(state.config, i) for i in range(state.config.num_hidden_layers))


def plan(state: PlanState, cfg: PruneFfnConfig) -> PlanState:
    s, adapter, m = state.shape, state.adapter, cfg.multiple_of
    what = "each expert's width" if adapter.is_moe else "the FFN width"
    if cfg.intermediate_size is not None:
        new = cfg.intermediate_size
        if new >= s.ffn:
            raise PlanError("intermediate_size", f"{what} is {s.ffn}; intermediate_size must be smaller")
        if new % m:
            options = " or ".join(str(w) for w in (new // m * m, (new // m + 1) * m) if 0 < w < s.ffn)
            raise PlanError("intermediate_size", f"{new} is not a multiple of multiple_of ({m})"
                            + (f": use {options}" if options else "") + ", or lower multiple_of")
    else:
        assert cfg.ratio is not None
        new = imp.round_to_multiple(s.ffn * (1 - cfg.ratio), m)
        if new >= s.ffn:
            raise PlanError("ratio", f"ratio {cfg.ratio} of {what} {s.ffn} gives {s.ffn * (1 - cfg.ratio):.1f}, which "
                                     f"rounds to {new} with multiple_of {m}: nothing would be removed; raise the "
                                     "ratio or lower multiple_of")
    fraction = new / s.ffn
    if not adapter.is_moe:
        return state.with_config(adapter.with_ffn(state.config, width=new))
    dense = imp.scaled_width(state.config.intermediate_size, fraction, m) if _has_dense_layers(state) else None
    shared = imp.scaled_width(s.shared_ffn, fraction, m) if s.shared_ffn else None
    return state.with_config(adapter.with_ffn(state.config, width=dense, expert_width=new, shared_width=shared))


# ---------------------------------------------------------------- scores and surgery


def _mlp_scores(mlp: Any, taylor: bool) -> torch.Tensor:
    """Per channel of a dense MLP (gate_proj/up_proj/down_proj): [I]."""
    return (unit_scores(mlp.gate_proj.weight, 1, taylor) + unit_scores(mlp.up_proj.weight, 1, taylor)
            + unit_scores(mlp.down_proj.weight, 0, taylor))


def _expert_scores(experts: Any, taylor: bool) -> torch.Tensor:
    """Per expert and channel of fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]): [E, I]."""
    gu, down = experts.gate_up_proj, experts.down_proj
    if taylor:
        assert gu.grad is not None and down.grad is not None, "taylor scores need gradients"
        rows = imp.taylor_terms(gu, gu.grad, 2)  # [E, 2I]
        cols = imp.taylor_terms(down, down.grad, 1)  # [E, I]
    else:
        rows, cols = imp.row_square_norms(gu, 2), imp.row_square_norms(down, 1)
    width = down.shape[2]
    return (rows[:, :width] + rows[:, width:] + cols).double().cpu()


def _slice_mlp(mlp: Any, kept: list[int]) -> None:
    idx = torch.tensor(kept, dtype=torch.long)
    slice_linear(mlp.gate_proj, rows=idx)
    slice_linear(mlp.up_proj, rows=idx)
    slice_linear(mlp.down_proj, cols=idx)


def _slice_experts(experts: Any, kept: list[list[int]]) -> None:
    gu, down = experts.gate_up_proj.data, experts.down_proj.data
    width = down.shape[2]
    new_gu, new_down = [], []
    for e, channels in enumerate(kept):
        idx = torch.tensor(channels, dtype=torch.long, device=gu.device)
        new_gu.append(torch.cat([gu[e].index_select(0, idx), gu[e].index_select(0, idx + width)]))  # gate, then up
        new_down.append(down[e].index_select(1, idx))
    experts.gate_up_proj = nn.Parameter(torch.stack(new_gu), requires_grad=False)
    experts.down_proj = nn.Parameter(torch.stack(new_down), requires_grad=False)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = len(kept[0])


class _FfnStats(Collector):
    """Channel magnitudes of one layer's dense MLP, shared expert and experts."""

    def __init__(self, unrouted: list[int]) -> None:
        super().__init__()
        self.unrouted = unrouted  # filled with the experts no calibration token reached
        self.aggs: dict[str, imp.Aggregate] = {}
        self.experts: Any = None
        self.expert_aggs: list[imp.Aggregate] = []

    def dense(self, part: str, channels: int) -> Any:
        self.aggs[part] = agg = imp.Aggregate(channels)

        def hook(x: torch.Tensor, *_: Any) -> None:  # down_proj's input: act(gate)*up, [B, S, I] or [B*S, I]
            agg.add(imp.channel_magnitudes(x.reshape(*self.batch, x.shape[-1])))

        return hook

    def routed(self, experts: Any) -> Any:
        self.experts = experts
        n, width = experts.down_proj.shape[0], experts.down_proj.shape[2]
        self.expert_aggs = [imp.Aggregate(width) for _ in range(n)]

        def hook(x: torch.Tensor, top_k_index: torch.Tensor, *_: Any) -> None:  # x [B*S, H], top_k_index [B*S, k]
            windows, seq_len = self.batch
            for e, agg in enumerate(self.expert_aggs):
                tokens = (top_k_index == e).any(dim=-1).nonzero().squeeze(1)
                if tokens.numel() == 0:
                    continue
                proj = nn.functional.linear(x[tokens], experts.gate_up_proj[e])  # [n, 2I]: gate, then up
                act = experts._apply_gate(proj).float().abs()  # act(gate) * up, as the experts compute it
                means, counts = imp.window_means(act, tokens // seq_len, windows)
                agg.add(means, counts > 0)

        return hook

    def scores(self) -> dict[str, torch.Tensor]:
        out = {part: agg.scores() for part, agg in self.aggs.items()}
        if self.experts is not None:
            fallback = _expert_scores(self.experts, taylor=False).sqrt()
            self.unrouted[:] = [e for e, agg in enumerate(self.expert_aggs) if not agg.windows]
            out["experts"] = torch.stack([agg.scores() if agg.windows else fallback[e]
                                          for e, agg in enumerate(self.expert_aggs)])
        return out


class FfnPruner(LayerPruner):
    def __init__(self, adapter: Any, config: Any, target: Any):
        super().__init__(adapter, config, target)
        self.unrouted: dict[str, list[int]] = {}  # layer -> experts scored by magnitude (no routed tokens)

    def targets(self, layer: nn.Module, index: int) -> dict[str, int]:
        if self.adapter.experts(layer) is None:
            return {"mlp": self.target.intermediate_size}
        shape = self.adapter.shape(self.target)
        out = {"experts": shape.ffn}
        if self.adapter.shared_expert(layer) is not None:
            out["shared_expert"] = shape.shared_ffn
        return out

    def collector(self, layer: nn.Module, index: int) -> Collector:
        col = _FfnStats(self.unrouted.setdefault(str(index), []))
        experts: Any = self.adapter.experts(layer)
        shared: Any = self.adapter.shared_expert(layer)
        if experts is None:
            mlp: Any = self.adapter.mlp(layer)
            col.hook(mlp.down_proj, col.dense("mlp", mlp.down_proj.in_features))
        else:
            col.hook(experts, col.routed(experts))
            if shared is not None:
                col.hook(shared.down_proj, col.dense("shared_expert", shared.down_proj.in_features))
        return col

    def weight_scores(self, layer: nn.Module, index: int, taylor: bool) -> dict[str, torch.Tensor]:
        experts, shared = self.adapter.experts(layer), self.adapter.shared_expert(layer)
        if experts is None:
            out = {"mlp": _mlp_scores(self.adapter.mlp(layer), taylor)}
        else:
            out = {"experts": _expert_scores(experts, taylor)}
            if shared is not None:
                out["shared_expert"] = _mlp_scores(shared, taylor)
        return out if taylor else {k: v.sqrt() for k, v in out.items()}

    def edit(self, layer: nn.Module, kept: dict[str, Any]) -> None:
        if "mlp" in kept:
            _slice_mlp(self.adapter.mlp(layer), kept["mlp"])
        if "experts" in kept:
            experts = self.adapter.experts(layer)
            assert experts is not None
            _slice_experts(experts, kept["experts"])
        if "shared_expert" in kept:
            shared = self.adapter.shared_expert(layer)
            assert shared is not None
            _slice_mlp(shared, kept["shared_expert"])


def run(ctx: StageContext, cfg: PruneFfnConfig) -> StageResult:
    before, after = ctx.before.shape, ctx.after.shape
    pruner = FfnPruner(ctx.source.adapter, ctx.source.config, ctx.after.config)
    result = run_structured(ctx, cfg.criterion, pruner, "pruning FFN channels")
    widths: dict[str, Any] = {"ffn": f"{before.ffn} -> {after.ffn}"}
    if before.shared_ffn:
        widths["shared_ffn"] = f"{before.shared_ffn} -> {after.shared_ffn}"
    if ctx.source.adapter.is_moe and _has_dense_layers(ctx.before):
        widths["dense_ffn"] = f"{ctx.before.config.intermediate_size} -> {ctx.after.config.intermediate_size}"
    unrouted = {layer: experts for layer, experts in pruner.unrouted.items() if experts}
    if unrouted:
        log.warning("%s: %d expert(s) received no calibration token and were ranked by weight magnitude; "
                    "more calibration samples would cover them", ctx.stage.label, sum(map(len, unrouted.values())))
        widths["experts_ranked_by_magnitude"] = unrouted
    result.notes = {**widths, **result.notes}
    return result
