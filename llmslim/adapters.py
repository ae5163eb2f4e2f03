"""Architecture tables: where the decoder layers, attention, MLP, experts and router of each supported
model family live, how their configs change after a structural edit, and how MoE expert weights are
laid out on disk versus in memory.

transformers 5 keeps MoE experts fused in memory (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
[E, H, I]) but reads and writes the per-expert layout on disk (`experts.{e}.w1.weight`, ...), which is
also what vLLM loads. Our streaming reader/writer convert between the two here, per layer.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .errors import UserError


@dataclass(frozen=True)
class MoeLayout:
    """How one family stores its experts."""

    disk_block: str  # name of the MoE block on disk: "block_sparse_moe" (Mixtral) or "mlp" (Qwen)
    disk_proj: tuple[str, str, str]  # on-disk names of (gate, up, down) per expert
    experts_field: str  # config field holding the expert count
    width_field: str  # config field holding each expert's intermediate width
    shared_width_field: str | None = None  # config field of the shared expert's width (Qwen2-MoE)
    dense_layers: bool = False  # the family can mix dense MLP layers in (mlp_only_layers, decoder_sparse_step)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    class_name: str
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3): acts on head_dim, unaffected by head pruning
    moe: MoeLayout | None = None
    # The RMSNorm feeding the MLP. Llama-likes: post_attention_layernorm; Gemma 3's "sandwich" layers normalise
    # the attention output with post_attention_layernorm (before the residual add) and the MLP input with
    # pre_feedforward_layernorm (and its output with post_feedforward_layernorm).
    mlp_norm: str = "post_attention_layernorm"
    # Gemma's RMSNorm computes (1 + weight) * x / rms(x) (weights stored around 0); Llama's weight * x / rms(x).
    norm_offset: float = 0.0
    # transformers' config validation (Gemma3TextConfig) wants hidden_size % num_attention_heads == 0 even
    # though head_dim is explicit and free: a pruned head count must keep that.
    heads_divide_hidden: bool = False
    # Why moefy cannot turn this family into an MoE architecture vLLM and transformers serve, or None.
    no_moe_target: str | None = None


def _qwen_moe(shared_width_field: str | None = None) -> MoeLayout:
    return MoeLayout(disk_block="mlp", disk_proj=("gate_proj", "up_proj", "down_proj"), experts_field="num_experts",
                     width_field="moe_intermediate_size", shared_width_field=shared_width_field, dense_layers=True)


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in [
    Architecture("llama", "LlamaForCausalLM"),
    Architecture("mistral", "MistralForCausalLM"),
    Architecture("qwen2", "Qwen2ForCausalLM"),
    Architecture("qwen3", "Qwen3ForCausalLM", qk_norm=True),
    Architecture("mixtral", "MixtralForCausalLM", moe=MoeLayout(
        disk_block="block_sparse_moe", disk_proj=("w1", "w3", "w2"), experts_field="num_local_experts",
        width_field="intermediate_size")),
    Architecture("qwen2_moe", "Qwen2MoeForCausalLM", moe=_qwen_moe("shared_expert_intermediate_size")),
    Architecture("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, moe=_qwen_moe()),
    Architecture("gemma3_text", "Gemma3ForCausalLM", qk_norm=True, mlp_norm="pre_feedforward_layernorm",
                 norm_offset=1.0, heads_divide_hidden=True, no_moe_target=(
                     "Gemma 3 has no MoE counterpart that vLLM and transformers serve: Mixtral and Qwen-MoE lack "
                     "its sandwich norms, (1 + weight) RMSNorms, scaled embeddings and sliding/global layers, "
                     "and Gemma 4's MoE normalises the attention values (v_norm), which changes every layer's "
                     "function; prune FFN channels instead")),
]}


@dataclass(frozen=True)
class ModelShape:
    """The numbers a plan shows for a model: what each structural method changes."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense MLP width, or each expert's width for MoE layers
    experts: int = 0
    top_k: int = 0
    shared_ffn: int = 0
    vocab: int = 0


_LAYER_KEY = re.compile(r"^(model\.layers\.(\d+)\.)(.*)$")


class Adapter:
    """Answers "where is X" and "what does the config become" for one model family."""

    def __init__(self, arch: Architecture):
        self.arch = arch

    # ------------------------------------------------------------------ lookup

    @classmethod
    def for_config(cls, config: PretrainedConfig, source: str = "model") -> Adapter:
        """The adapter for a config, or a UserError listing the supported architectures."""
        arch = ARCHITECTURES.get(getattr(config, "model_type", ""))
        if arch is None:
            found = getattr(config, "model_type", "?")
            classes = ", ".join(getattr(config, "architectures", None) or []) or "?"
            raise UserError(f"{source}: architecture '{found}' ({classes}) is not supported; supported: "
                            + ", ".join(f"{a.model_type} ({a.class_name})" for a in ARCHITECTURES.values()))
        return cls(arch)

    @property
    def is_moe(self) -> bool:
        return self.arch.moe is not None

    # ------------------------------------------------------------------ where things are (in memory)

    def layers(self, model: Any) -> nn.ModuleList:
        """The decoder layers of a *ForCausalLM model."""
        return model.model.layers

    def attention(self, layer: Any) -> nn.Module:
        """The attention module: q_proj, k_proj, v_proj, o_proj (and q_norm/k_norm for Qwen3)."""
        return layer.self_attn

    def mlp(self, layer: Any) -> nn.Module:
        """The feed-forward block: a dense MLP (gate_proj/up_proj/down_proj) or a sparse MoE block."""
        return layer.mlp

    def experts(self, layer: Any) -> nn.Module | None:
        """The fused experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I]), or None."""
        return getattr(layer.mlp, "experts", None)

    def router(self, layer: Any) -> nn.Module | None:
        """The router (its `weight` is [E, H]), or None for a dense layer."""
        return layer.mlp.gate if self.experts(layer) is not None else None

    def shared_expert(self, layer: Any) -> nn.Module | None:
        """Qwen2-MoE's always-on expert (a dense MLP), or None."""
        return getattr(layer.mlp, "shared_expert", None)

    @torch.no_grad()
    def divide_norm(self, norm: Any, s: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Divide an RMSNorm's output by s [dim]; returns the divisor its weight, as stored in `dtype`,
        realises, by which the caller scales the Linears that read the norm (the function stays exact).

        Llama-likes: weight / s (returns s). Gemma's norms compute (1 + weight) x / rms(x), so 1 + weight'
        = (1 + weight) / s, and a gain shrunk towards 0 leaves weight' near -1, where bf16 keeps an absolute
        precision of 2^-9: a large relative error of a small gain (0.8 % of a norm-and-Linear output at a
        20-fold shrink). The stored weight' is what the model computes with, so the divisor returned is
        (1 + weight) / (1 + weight'), with 1 + weight' formed as Gemma forms it (float32). A channel whose gain would
        round to 0 keeps its weight (divisor 1)."""
        w, offset = norm.weight, self.arch.norm_offset
        if not offset:
            norm.weight.data = (w.float() / s).to(w.dtype)
            return s
        gain = offset + w.float()
        stored = (gain / s - offset).to(dtype or w.dtype)
        new = offset + stored.float()
        dead = new == 0
        norm.weight.data = torch.where(dead, w, stored.to(w.dtype))
        return torch.where(dead, torch.ones_like(gain), gain / torch.where(dead, 1.0, new))

    def layer_kind(self, config: PretrainedConfig, index: int) -> str | None:
        """'sliding' or 'full' for models that mix sliding-window and global attention layers (Gemma 3,
        sliding-window Qwen2/3), None when every layer attends alike."""
        types = getattr(config, "layer_types", None) or []
        if len(set(types)) < 2:
            return None
        return "sliding" if types[index] == "sliding_attention" else "full"

    def is_moe_layer(self, config: PretrainedConfig, index: int) -> bool:
        """Whether decoder layer `index` has a sparse MoE block (Qwen-MoE can mix in dense layers)."""
        moe = self.arch.moe
        if moe is None:
            return False
        if not moe.dense_layers:
            return True
        return (index not in (config.mlp_only_layers or []) and getattr(config, moe.experts_field) > 0
                and (index + 1) % config.decoder_sparse_step == 0)

    # ------------------------------------------------------------------ shapes and config rewrites

    def shape(self, config: PretrainedConfig) -> ModelShape:
        heads = config.num_attention_heads
        moe = self.arch.moe
        return ModelShape(
            layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            ffn=getattr(config, moe.width_field) if moe else config.intermediate_size,
            experts=getattr(config, moe.experts_field) if moe else 0,
            top_k=getattr(config, "num_experts_per_tok", 0) if moe else 0,
            shared_ffn=getattr(config, moe.shared_width_field) if moe and moe.shared_width_field else 0,
            vocab=config.vocab_size,
        )

    def with_layers(self, config: PretrainedConfig, keep: list[int]) -> PretrainedConfig:
        """The config after keeping only decoder layers `keep` (renumbered 0..len-1). Per-layer lists
        (layer_types, mlp_only_layers) are rewritten so every kept layer keeps its kind."""
        n = config.num_hidden_layers
        if not keep or sorted(set(keep)) != list(keep) or keep[-1] >= n:
            raise ValueError(f"layers to keep must be sorted, unique and < {n}: {keep}")
        new = copy.deepcopy(config)
        new.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None) is not None:
            new.layer_types = [config.layer_types[i] for i in keep]
        if getattr(config, "max_window_layers", None) is not None:
            # Qwen2/3 use sliding attention for layers >= max_window_layers: keep that boundary.
            new.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
        moe = self.arch.moe
        if moe is not None and moe.dense_layers:
            # The periodic decoder_sparse_step pattern does not survive renumbering: list dense layers explicitly.
            new.mlp_only_layers = [j for j, i in enumerate(keep) if not self.is_moe_layer(config, i)]
            new.decoder_sparse_step = 1
        return new

    def with_heads(self, config: PretrainedConfig, heads: int, kv_heads: int) -> PretrainedConfig:
        """The config after head pruning (head_dim is pinned explicitly so it cannot be re-derived). A Qwen2
        model whose head count no longer gives hidden_size / heads = head_dim becomes a Llama model (see
        `qwen2_as_llama`)."""
        if self.arch.heads_divide_hidden and config.hidden_size % heads:
            raise ValueError(f"{config.model_type}: transformers' config class requires hidden_size "
                             f"({config.hidden_size}) to be a multiple of num_attention_heads ({heads} after "
                             "pruning), although head_dim is explicit: keep a KV-head count whose query heads "
                             "divide it")
        new = copy.deepcopy(config)
        new.head_dim = self.shape(config).head_dim
        new.num_attention_heads = heads
        new.num_key_value_heads = kv_heads
        if config.model_type == "qwen2" and heads * new.head_dim != config.hidden_size:
            return qwen2_as_llama(new)
        return new

    def with_ffn(self, config: PretrainedConfig, width: int | None = None, expert_width: int | None = None,
                 shared_width: int | None = None) -> PretrainedConfig:
        """The config after FFN-channel pruning of dense layers, experts and the shared expert."""
        new = copy.deepcopy(config)
        moe = self.arch.moe
        if width is not None and (moe is None or moe.dense_layers):
            new.intermediate_size = width
        if expert_width is not None and moe is not None:
            setattr(new, moe.width_field, expert_width)
        if shared_width is not None and moe is not None and moe.shared_width_field:
            setattr(new, moe.shared_width_field, shared_width)
        return new

    # ------------------------------------------------------------------ disk <-> memory layout

    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Memory names/layout -> checkpoint names/layout (per-expert tensors), as transformers saves."""
        moe = self.arch.moe
        if moe is None:
            return dict(state)
        gate, up, down = moe.disk_proj
        out: dict[str, torch.Tensor] = {}
        for key, t in state.items():
            m = _LAYER_KEY.match(key)
            if m is None or not m.group(3).startswith("mlp."):
                out[key] = t
                continue
            prefix, rest = m.group(1), m.group(3)[len("mlp."):]
            block = f"{prefix}{moe.disk_block}."
            if rest == "experts.gate_up_proj":  # [E, 2I, H]: gate rows first, then up rows
                width = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{block}experts.{e}.{gate}.weight"] = t[e, :width].clone()
                    out[f"{block}experts.{e}.{up}.weight"] = t[e, width:].clone()
            elif rest == "experts.down_proj":  # [E, H, I]
                for e in range(t.shape[0]):
                    out[f"{block}experts.{e}.{down}.weight"] = t[e].clone()
            else:
                out[block + rest] = t
        return out

    def from_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint names/layout -> memory names/layout (experts stacked and fused)."""
        moe = self.arch.moe
        if moe is None:
            return dict(tensors)
        gate, up, down = moe.disk_proj
        expert_key = re.compile(rf"^(model\.layers\.\d+\.){re.escape(moe.disk_block)}\.experts\.(\d+)\."
                                rf"({gate}|{up}|{down})\.weight$")
        out: dict[str, torch.Tensor] = {}
        grouped: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        for key, t in tensors.items():
            m = expert_key.match(key)
            if m:
                grouped.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
                continue
            lm = _LAYER_KEY.match(key)
            if lm and lm.group(3).startswith(moe.disk_block + "."):
                key = f"{lm.group(1)}mlp.{lm.group(3)[len(moe.disk_block) + 1:]}"
            out[key] = t
        for prefix, parts in grouped.items():
            n = len(parts.get(gate, {}))
            if not all(len(parts.get(p, {})) == n and sorted(parts[p]) == list(range(n)) for p in moe.disk_proj):
                raise UserError(f"{prefix}{moe.disk_block}: incomplete expert weights in the checkpoint")
            out[f"{prefix}mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([parts[gate][e], parts[up][e]], dim=0) for e in range(n)])
            out[f"{prefix}mlp.experts.down_proj"] = torch.stack([parts[down][e] for e in range(n)])
        return out


def qwen2_as_llama(config: PretrainedConfig) -> PretrainedConfig:
    """The same network as a Llama config, for Qwen2 models with fewer heads than hidden_size / head_dim.

    vLLM's Qwen2 (0.32) computes head_dim as hidden_size / num_attention_heads, ignoring config.head_dim,
    so a Qwen2 checkpoint with fewer heads does not load there. Llama reads head_dim from the config in
    both vLLM and transformers, and with `attention_bias: true` gives q, k, v *and* o_proj a bias: with
    o_proj's bias all zeros (the pruning stage writes it) a Llama layer computes exactly what the Qwen2
    layer did (same RMSNorm, rotary embedding, SwiGLU MLP and weight names). Sliding-window attention,
    which Llama cannot express, is refused. The tokenizer and chat template are files beside the
    weights and stay as they are."""
    from transformers import LlamaConfig

    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) and any(t != "full_attention" for t in layer_types):
        raise ValueError("this Qwen2 model uses sliding-window attention, which the Llama architecture that "
                         "serves a head-pruned Qwen2 in vLLM cannot express")
    d = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "use_sliding_window", "sliding_window",
                "max_window_layers", "layer_types", "attention_bias", "mlp_bias"):
        d.pop(key, None)
    new = LlamaConfig(**d, attention_bias=True, mlp_bias=False)
    new.architectures = ["LlamaForCausalLM"]
    return new


def layer_of(key: str) -> int | None:
    """The decoder-layer index a checkpoint or state-dict key belongs to, or None."""
    m = _LAYER_KEY.match(key)
    return int(m.group(2)) if m else None
