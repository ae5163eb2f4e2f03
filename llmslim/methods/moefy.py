"""moefy: turn each dense FFN into routed experts (MoEfication, LLaMA-MoE), exported as an MoE
architecture that transformers and vLLM already serve.

Per decoder layer, on calibration tokens (one layer in memory at a time, layer-sequential like gptq):
1. The FFN's channels act(gate_j x) * up_j x are measured on up to `tokens` tokens.
2. `shared: S` channels with the largest mean |activation| become an always-on shared expert.
3. The other channels split into `experts: E` equal groups: balanced_cluster (k-means of the channels'
   activation patterns, every step under the equal-size constraint), cluster (unconstrained k-means,
   made equal-size at the end) or random. Channels that fire together share an expert.
4. The router starts as a linear probe: ridge regression on the FFN input x of each expert's gain for
   the token (how much closer to the dense output it brings it alone, routing.expert_gains); its scale
   (softmax temperature) is searched for the smallest error against the dense FFN on those tokens.

The routing math, and how the export reconciles it with the dense FFN. The dense FFN is the sum of all
its experts, each with weight 1: down(act) = sum_e down_e(act_e). The exported architectures weight the
top_k experts by router probabilities normalised over the top k (Mixtral always; Qwen2/3-MoE with
`norm_topk_prob: true`, which we write), so the weights sum to 1, not to k. The export therefore folds a
factor top_k into every expert's down projection: with weights near 1/k each selected expert again
counts about once. The router's scale (softmax temperature) is searched per layer on the calibration
tokens for the smallest error against the dense FFN; it only changes how far the weights leave 1/k (the
ranking is the same for every positive scale). With top_k = E the router is set to zero: every weight is
exactly 1/E, and the MoE model computes the dense model (tested). The shared expert (Qwen2-MoE) is
scaled by sigmoid(gate(x)); its gate is written as zero (sigmoid = 1/2) and its down projection doubled.
A following `distill` stage trains the router and experts from there.

Architectures: Llama/Mistral become Mixtral without a shared expert and Qwen2-MoE with one (zero q/k/v
biases, which Qwen2-MoE always has); Qwen2 becomes Qwen2-MoE (needs `shared`); Qwen3 becomes Qwen3-MoE
(no shared expert in that architecture).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn
from transformers import MixtralConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from ..adapters import Adapter
from ..faults import crash_point
from ..layerstore import done_layers, layer_file, load_layer, save_layer, write_export
from ..layerwise import forward_layer, walk
from ..plan import PlanError, PlanState
from ..stage import StageContext, StageResult
from . import routing
from .configs.moefy import MoefyConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- plan: the target architecture

_COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
           "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
           "attention_dropout", "dtype")


def target_config(config: PretrainedConfig, cfg: MoefyConfig) -> PretrainedConfig:
    """The MoE config a dense config becomes; ValueError(field, why) names what does not fit."""
    kind = config.model_type
    refused = Adapter.for_config(config).arch.no_moe_target
    if refused:
        raise PlanError("method", refused)
    width = config.intermediate_size
    if cfg.shared >= width:
        raise PlanError("shared", f"shared {cfg.shared} must be less than the FFN width {width}")
    routed = width - cfg.shared
    if routed % cfg.experts:
        options = [e for e in range(2, min(routed, 64) + 1) if routed % e == 0]
        raise PlanError("experts", f"the FFN width {width}" + (f" less shared {cfg.shared}" if cfg.shared else "")
                        + f" = {routed} does not divide into {cfg.experts} equal experts; divisors: "
                        + ", ".join(map(str, options[:12])))
    if getattr(config, "mlp_bias", False):
        raise PlanError("experts", "this model's MLP has biases, which the MoE architectures' experts do not")
    common: dict[str, Any] = {k: getattr(config, k) for k in _COMMON if getattr(config, k, None) is not None}
    moe: dict[str, Any] = dict(num_experts_per_tok=cfg.top_k, output_router_logits=False)
    heads_fit = config.num_attention_heads * Adapter.for_config(config).shape(config).head_dim == config.hidden_size
    if kind in ("llama", "mistral") and cfg.shared == 0:
        if getattr(config, "attention_bias", False):
            raise PlanError("shared", "this Llama model has attention biases, which Mixtral cannot hold; give "
                                      "`shared` > 0 to export as Qwen2-MoE instead")
        new: PretrainedConfig = MixtralConfig(**common, **moe, intermediate_size=routed // cfg.experts,
                                              num_local_experts=cfg.experts,
                                              sliding_window=getattr(config, "sliding_window", None))
    elif kind in ("llama", "mistral", "qwen2"):
        if cfg.shared == 0:
            raise PlanError("shared", "a Qwen2 model becomes Qwen2-MoE, which vLLM builds with a shared expert: "
                                      "give `shared` > 0")
        if kind != "qwen2" and (getattr(config, "attention_bias", False) or getattr(config, "sliding_window", None)):
            raise PlanError("shared", "with a shared expert the export is Qwen2-MoE, which cannot hold this model's "
                                      "o_proj bias or sliding-window attention; use shared: 0 (Mixtral)")
        if not heads_fit:
            raise PlanError("shared", "Qwen2-MoE (the architecture with a shared expert) derives head_dim from "
                                      "hidden_size / num_attention_heads, which this model's heads do not satisfy; "
                                      "use shared: 0 (Mixtral)")
        if getattr(config, "use_sliding_window", False):
            raise PlanError("shared", "sliding-window Qwen2 models are not supported by moefy")
        new = Qwen2MoeConfig(**common, **moe, intermediate_size=width, moe_intermediate_size=routed // cfg.experts,
                             shared_expert_intermediate_size=cfg.shared, num_experts=cfg.experts,
                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
                             use_sliding_window=False)
    elif kind == "qwen3":
        if cfg.shared:
            raise PlanError("shared", "Qwen3 models become Qwen3-MoE, which has no shared expert: use shared: 0")
        new = Qwen3MoeConfig(**common, **moe, intermediate_size=width, moe_intermediate_size=routed // cfg.experts,
                             num_experts=cfg.experts, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                             attention_bias=getattr(config, "attention_bias", False), use_sliding_window=False)
    else:
        raise PlanError("experts", f"moefy turns dense models into MoE; this model is already '{kind}' "
                                   "(use prune_experts or set_topk)")
    new.architectures = [Adapter.for_config(new).arch.class_name]
    return new


def plan(state: PlanState, cfg: MoefyConfig) -> PlanState:
    return state.with_config(target_config(state.config, cfg))


# ---------------------------------------------------------------- one layer

_BLOCKS: dict[str, type[nn.Module]] = {"mixtral": MixtralSparseMoeBlock, "qwen2_moe": Qwen2MoeSparseMoeBlock,
                                       "qwen3_moe": Qwen3MoeSparseMoeBlock}


def empty_block(config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    with torch.device(device):
        return _BLOCKS[config.model_type](config).to(dtype).eval()


def _activations(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    """act(gate x) * up x of a dense MLP, float32: [T, I]."""
    return (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()


def split_channels(act: torch.Tensor, experts: int, shared: int, split: str,
                   generator: torch.Generator) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """moefy's split of a dense FFN's channels from its activations act [T, I]: the `shared` channels of largest
    mean |activation| (sorted; None when 0), and the others as `experts` index groups, by `split` (random, or a
    clustering of their |activation| profiles, balanced or not)."""
    channels = act.shape[1]
    kept = torch.topk(act.abs().mean(0), shared).indices.sort().values if shared else None
    rest = torch.ones(channels, dtype=torch.bool)
    if kept is not None:
        rest[kept] = False
    rest_idx = torch.nonzero(rest).squeeze(1)
    if split == "random":
        assign = routing.random_split(len(rest_idx), experts, generator)
    else:
        assign = routing.cluster_channels(act[:, rest_idx].abs().T.cpu(), experts, balanced=split == "balanced_cluster",
                                          generator=generator)
    return kept, [rest_idx[g] for g in routing.groups_of(assign, experts)]


def build_block(mlp: Any, x: torch.Tensor, config: PretrainedConfig, cfg: MoefyConfig,
                generator: torch.Generator) -> tuple[nn.Module, dict[str, Any], routing.RoutingStats]:
    """The MoE block that replaces dense `mlp`, measured on its inputs x [T, H]."""
    started = time.perf_counter()
    E, k = cfg.experts, cfg.top_k
    with torch.no_grad():
        down = mlp.down_proj.weight.float()  # [H, I]
        act = _activations(mlp, x)
    shared, experts = split_channels(act, E, cfg.shared, cfg.split, generator)
    groups = [g.tolist() for g in experts]
    with torch.no_grad():
        expert_out = torch.stack([act[:, g] @ down[:, g].T for g in groups])  # [E, T, H]
    routed_dense = expert_out.sum(0)
    if k == E:  # uniform weights 1/E: exactly the dense FFN
        errors: dict[str, float] = {}
        router, scale = torch.zeros(E, x.shape[1]), 0.0
    else:
        xs, outs, dense_s = x.float().cpu(), expert_out.cpu(), routed_dense.cpu()
        probe = routing.fit_router_probe(xs, routing.expert_gains(outs, dense_s))
        m = min(len(x), 2048)
        scale, errors = routing.search_router_scale(xs[:m], probe, outs[:, :m], dense_s[:m], k, normalize=True)
        router = probe * scale
    logits = x.float().cpu() @ router.T
    weights = routing.route(logits, k, normalize=True)
    stats = routing.RoutingStats(E)
    stats.add(logits, weights)
    # the shared expert is computed exactly, so the block's error is the routed part's; relative to the whole FFN
    dense = routed_dense + (act[:, shared] @ down[:, shared].T if shared is not None else 0)
    error = (routing.moe_output(expert_out, weights.to(expert_out.device), k) - routed_dense).double().pow(2).sum()
    rel_err = (error / dense.double().pow(2).sum().clamp(min=1e-30)).item()

    dtype, device = mlp.down_proj.weight.dtype, mlp.down_proj.weight.device
    block: Any = empty_block(config, dtype, device)
    w_gate, w_up, w_down = mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data
    with torch.no_grad():
        block.gate.weight.copy_(router.to(dtype))
        block.experts.gate_up_proj.copy_(torch.stack([torch.cat([w_gate[g], w_up[g]]) for g in groups]))
        block.experts.down_proj.copy_(torch.stack([w_down[:, g] * k for g in groups]))  # the folded top_k
        if shared is not None:
            block.shared_expert.gate_proj.weight.copy_(w_gate[shared])
            block.shared_expert.up_proj.weight.copy_(w_up[shared])
            block.shared_expert.down_proj.weight.copy_(w_down[:, shared] * 2)  # sigmoid(0) = 1/2
            block.shared_expert_gate.weight.zero_()
    notes = {"router_scale": round(scale, 6), "scale_search": errors, "relative_error": round(rel_err, 6),
             "seconds": round(time.perf_counter() - started, 3)}
    return block, notes, stats


def _mlp_inputs(layer: nn.Module, adapter: Adapter, inputs: Any) -> torch.Tensor:
    """Every calibration token's FFN input in this layer (the post-attention RMSNorm output): [N*S, H]."""
    seen: list[torch.Tensor] = []
    handle = adapter.mlp(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        forward_layer(layer, inputs)
    finally:
        handle.remove()
    return torch.cat(seen)


def _zero_biases(layer: nn.Module, config: PretrainedConfig, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Qwen2-MoE always has q/k/v biases: zeros when the dense model had none."""
    if config.model_type != "qwen2_moe":
        return {}
    attn: Any = layer.self_attn
    return {f"{prefix}self_attn.{p}.bias": torch.zeros(getattr(attn, p).out_features, dtype=dtype) for p in ("q_proj", "k_proj", "v_proj")
            if getattr(getattr(attn, p), "bias", None) is None}


def run(ctx: StageContext, cfg: MoefyConfig) -> StageResult:
    src, target = ctx.source, ctx.after
    config = copy.deepcopy(target.config)
    config.dtype = ctx.dtype
    adapter = target.adapter
    lazy = ctx.lazy_model()
    n = len(lazy.layers)
    done = done_layers(ctx, n, "converted")
    layers: dict[str, Any] = {}
    with ctx.progress.track(f"{ctx.stage.label}: dense -> {cfg.experts} experts, top {cfg.top_k}", n) as task:
        for step in walk(lazy, ctx.calibration_inputs(lazy), device=ctx.device):
            i, layer, prefix = step.index, step.layer, f"model.layers.{step.index}."
            file = layer_file(ctx.scratch_dir, i)
            if i in done:  # restore the converted layer bit for bit; the walk re-runs it for the next inputs
                tensors, notes = load_layer(file)
                block = empty_block(config, lazy.dtype, ctx.device)
                mlp = {k[len(prefix) + 4:]: v for k, v in adapter.from_disk(tensors).items() if k.startswith(prefix + "mlp.")}
                block.load_state_dict(mlp)
                layer.mlp = block
            else:
                x = _mlp_inputs(layer, src.adapter, step.inputs)
                gen = torch.Generator().manual_seed(ctx.seed + i)
                if len(x) > cfg.tokens:
                    x = x[torch.randperm(len(x), generator=gen)[:cfg.tokens].to(x.device)]
                block, notes, stats = build_block(src.adapter.mlp(layer), x, config, cfg, gen)
                del x
                for p in block.parameters():  # what the file holds, so a resumed run continues from the same values
                    p.data = p.data.to(ctx.dtype).to(p.dtype)
                layer.mlp = block
                notes["routing"] = stats.summary()
                state = {prefix + k: v.to(ctx.dtype) for k, v in layer.state_dict().items()}
                state.update(_zero_biases(layer, config, prefix, ctx.dtype))
                save_layer(file, adapter.to_disk(state), notes)
                crash_point("moefy.layer")
            layers[str(i)] = notes
            if i == n - 1:
                step.outputs = []
            task.advance()
    write_export(ctx, config, n)
    return StageResult(config, _notes(ctx, cfg, layers, len(done)))


def active_ffn_flops(config: PretrainedConfig) -> int:
    """Multiply-adds x 2 of one token's FFN (router and shared expert included), summed over layers."""
    adapter = Adapter.for_config(config)
    s = adapter.shape(config)
    total = 0
    for i in range(s.layers):
        if adapter.is_moe_layer(config, i):
            total += 2 * (3 * s.hidden * (s.ffn * s.top_k + s.shared_ffn) + s.hidden * s.experts + s.hidden * bool(s.shared_ffn))
        else:
            total += 2 * 3 * s.hidden * config.intermediate_size
    return total


def _notes(ctx: StageContext, cfg: MoefyConfig, layers: dict[str, Any], resumed: int) -> dict[str, Any]:
    before, after = ctx.before.config, ctx.after.config
    notes: dict[str, Any] = {
        "architecture": f"{(before.architectures or ['?'])[0]} -> {(after.architectures or ['?'])[0]}",
        "experts": cfg.experts, "top_k": cfg.top_k, "expert_width": ctx.after.shape.ffn,
        "shared": cfg.shared, "split": cfg.split,
        "active_ffn_flops_per_token": {"before": active_ffn_flops(before), "after": active_ffn_flops(after)},
        "routing": routing_notes({i: d.pop("routing") for i, d in layers.items()}),
        "layers": layers}
    if resumed:
        notes["layers_from_earlier_run"] = resumed
    return notes


def routing_notes(by_layer: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's routing statistics: per layer load, tokens per expert and entropies, and the experts
    that received no calibration token (named, with a warning)."""
    unrouted = {i: s["unrouted"] for i, s in by_layer.items() if s.get("unrouted")}
    if unrouted:
        log.warning("experts that received no calibration token (layer: experts): %s", unrouted)
    return {"layers": by_layer, "unrouted_experts": unrouted}
