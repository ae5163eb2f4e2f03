"""prune_heads: remove attention heads, a key/value head together with its query heads.

Grouped-query attention is pruned in groups: KV head j and its G = heads / kv query heads go or stay
together, so heads % kv_heads == 0 and head_dim are unchanged and the result is a standard config
(multi-head models are the case G = 1). The matching rows of q/k/v (and their biases, Qwen2) and the
matching input columns of o_proj are removed; Qwen3's q_norm/k_norm act on head_dim and are kept as
they are. Every layer keeps the same number of heads (one `num_key_value_heads` for all layers is what
vLLM and transformers build from); per-layer counts are refused.

Qwen2: vLLM derives its head_dim from hidden_size / num_attention_heads, so a Qwen2 checkpoint with
fewer heads would not load there. The pruned model is written as LlamaForCausalLM instead
(adapters.qwen2_as_llama: attention_bias true, explicit head_dim, o_proj bias all zeros), which vLLM and
transformers both serve and which computes the same function; the stage notes say so. Qwen2-MoE has no
such counterpart (no other MoE architecture of both libraries has its biased q/k/v and gated shared
expert without adding q/k norms, as Qwen3-MoE does) and is refused.

Criteria (score of a KV group; the lowest-scoring groups go, in every layer):
- activation (Minitron): L2 norm of each query head's attention output (o_proj's input) per token,
  averaged over a window's tokens, L2 over windows; a group scores the sum of its query heads. Measured
  one decoder layer at a time; layer i+1 is measured on what pruned layer i produces.
- magnitude: L2 norm of the group's weights (q/k/v rows with biases, o_proj columns); no data.
- taylor (LLM-Pruner, first order): sum over the group's weights of |dL/dw * w|, the gradient of the
  language-model loss on the calibration windows. Needs the whole model in memory.
- random: seeded by the recipe's seed; the baseline.

The measuring, selection and streaming are `structured.run_structured`, shared with prune_ffn.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..plan import PlanError, PlanState
from ..stage import StageContext, StageResult
from . import importance as imp
from .configs.prune_heads import PruneHeadsConfig
from .structured import (
    Collector,
    LayerPruner,
    run_structured,
    slice_linear,
    unit_scores,
)

# Families whose vLLM implementation (0.32) ignores config.head_dim and computes hidden_size / heads,
# and which no other architecture can stand in for: removing heads would yield checkpoints vLLM cannot
# load, so the plan refuses it. (Qwen2 becomes Llama instead: adapters.qwen2_as_llama.)
HEAD_DIM_FROM_HIDDEN = ("qwen2_moe",)


# ---------------------------------------------------------------- plan


def plan(state: PlanState, cfg: PruneHeadsConfig) -> PlanState:
    s = state.shape
    group = s.heads // s.kv_heads
    if cfg.kv_heads is not None:
        if cfg.kv_heads >= s.kv_heads:
            raise PlanError("kv_heads", f"the model has {s.kv_heads} KV heads per layer; kv_heads must be fewer "
                                        f"(1-{s.kv_heads - 1}) to remove any" if s.kv_heads > 1 else
                            "the model has a single KV head per layer: there is no head group to remove")
        keep = cfg.kv_heads
    else:
        assert cfg.ratio is not None
        keep = imp.kept_from_ratio(s.kv_heads, cfg.ratio)
        if keep == 0:
            raise PlanError("ratio", f"ratio {cfg.ratio} would remove all {s.kv_heads} KV heads (with their query "
                                     f"heads); at most {1 - 1 / s.kv_heads:.4g} keeps one")
        if keep == s.kv_heads:
            raise PlanError("ratio", f"ratio {cfg.ratio} removes no head: heads go in groups of {group} query "
                                     f"heads per KV head and the model has {s.kv_heads} KV heads, so the "
                                     f"smallest step is {1 / s.kv_heads:.4g}")
    if state.config.model_type in HEAD_DIM_FROM_HIDDEN and keep * group * s.head_dim != s.hidden:
        raise PlanError("kv_heads" if cfg.kv_heads is not None else "ratio",
                        f"{state.config.model_type} models cannot lose heads: vLLM derives their head_dim as "
                        f"hidden_size / num_attention_heads ({s.hidden} / {keep * group} after pruning) instead of "
                        f"reading head_dim ({s.head_dim}) from config.json, so the export would not load, and no "
                        "other MoE architecture that vLLM serves has Qwen2-MoE's q/k/v biases and gated shared "
                        "expert; prune FFN channels or drop layers instead")
    try:
        return state.with_config(state.adapter.with_heads(state.config, keep * group, keep))
    except ValueError as e:  # a Qwen2 model that cannot become Llama
        raise PlanError("kv_heads" if cfg.kv_heads is not None else "ratio", f"{e}; prune FFN channels or drop "
                        "layers instead") from None


# ---------------------------------------------------------------- heads


class _HeadStats(Collector):
    def __init__(self, heads: int, kv: int, head_dim: int):
        super().__init__()
        self.kv, self.head_dim = kv, head_dim
        self.agg = imp.Aggregate(heads)

    def o_proj_input(self, x: torch.Tensor) -> None:  # [B, S, heads * head_dim]
        self.agg.add(imp.head_output_norms(x, self.head_dim))

    def scores(self) -> dict[str, torch.Tensor]:
        return {"attention": imp.group_sum(self.agg.scores(), self.kv)}


class HeadPruner(LayerPruner):
    def targets(self, layer: nn.Module, index: int) -> dict[str, int]:
        return {"attention": self.adapter.shape(self.target).kv_heads}

    def _shape(self) -> tuple[int, int, int]:
        s = self.adapter.shape(self.config)
        return s.heads, s.kv_heads, s.head_dim

    def collector(self, layer: nn.Module, index: int) -> Collector:
        heads, kv, hd = self._shape()
        col = _HeadStats(heads, kv, hd)
        col.hook(self.adapter.attention(layer).o_proj, col.o_proj_input)
        return col

    def weight_scores(self, layer: nn.Module, index: int, taylor: bool) -> dict[str, torch.Tensor]:
        _, kv, _ = self._shape()
        attn: Any = self.adapter.attention(layer)
        total = torch.zeros(kv, dtype=torch.float64)
        for name, dim in (("q_proj", 1), ("k_proj", 1), ("v_proj", 1), ("o_proj", 0)):
            lin: Any = attn.get_submodule(name)
            total += imp.group_sum(unit_scores(lin.weight, dim, taylor), kv)
            if dim == 1 and getattr(lin, "bias", None) is not None:  # Qwen2's q/k/v biases
                total += imp.group_sum(unit_scores(lin.bias, 1, taylor), kv)
        return {"attention": total if taylor else total.sqrt()}

    def edit(self, layer: nn.Module, kept: dict[str, Any]) -> None:
        heads, kv, hd = self._shape()
        kept_kv = kept["attention"]
        q_heads = imp.query_heads(kept_kv, heads // kv)
        attn = self.adapter.attention(layer)
        slice_linear(attn.q_proj, rows=imp.head_rows(q_heads, hd))
        slice_linear(attn.k_proj, rows=imp.head_rows(kept_kv, hd))
        slice_linear(attn.v_proj, rows=imp.head_rows(kept_kv, hd))
        slice_linear(attn.o_proj, cols=imp.head_rows(q_heads, hd))
        # q_norm/k_norm (Qwen3) normalise each head over head_dim: shared by all heads, nothing to cut.
        o_proj: Any = attn.o_proj
        if getattr(self.target, "attention_bias", False) and o_proj.bias is None:
            # Qwen2 written as Llama: Llama's attention_bias gives o_proj a bias too; zeros keep the function.
            w = o_proj.weight
            o_proj.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)


def run(ctx: StageContext, cfg: PruneHeadsConfig) -> StageResult:
    before, after = ctx.before.shape, ctx.after.shape
    pruner = HeadPruner(ctx.source.adapter, ctx.source.config, ctx.after.config)
    result = run_structured(ctx, cfg.criterion, pruner, "pruning heads")
    result.notes = {"heads": f"{before.heads} -> {after.heads}", "kv_heads": f"{before.kv_heads} -> {after.kv_heads}",
                    **result.notes}
    old_arch, new_arch = ctx.source.adapter.arch.class_name, ctx.after.adapter.arch.class_name
    if old_arch != new_arch:
        result.notes["architecture"] = (
            f"{old_arch} -> {new_arch}: vLLM's Qwen2 derives head_dim from hidden_size / heads, which no longer "
            "holds; Llama with attention_bias (o_proj bias zero) and an explicit head_dim is the same network")
    return result
