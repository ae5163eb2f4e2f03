"""What the plan needs to know about a quantization stage's output: which weights get quantized
(`QuantFormat.targets`), how many bytes that takes on disk, and whether vLLM can serve the result.
(The stage's recipe parameters are in methods/configs/gptq.py.)

Which weights: every Linear of the decoder layers (attention q/k/v/o, MLP gate/up/down, the shared
expert of Qwen2-MoE) and every MoE expert's gate/up/down, minus `ignore`. Never quantized: embeddings,
lm_head, norms, MoE routers and Qwen2-MoE's 1-row `shared_expert_gate` (vLLM builds those unquantized too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ...adapters import Adapter
from ...cpu import VLLM_BITS, vllm_weight_only_bits
from ..configs.gptq import QuantFields, matches

# Linears that share their input: one Hessian serves the whole group (names relative to a decoder layer).
ATTENTION_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
MLP_GROUPS = (("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class Target:
    """Linears of one decoder layer that share their input (one Hessian), or one MoE experts module."""

    names: tuple[str, ...]  # memory names relative to the layer: "self_attn.q_proj" or "mlp.experts"
    experts: bool = False


def layer_targets(adapter: Adapter, layer: Any) -> list[Target]:
    """Everything quantizable in a decoder layer, before `ignore` is applied."""
    out = [Target(g) for g in ATTENTION_GROUPS]
    experts, shared = adapter.experts(layer), adapter.shared_expert(layer)
    if experts is None:
        out += [Target(tuple(f"mlp.{n}" for n in g)) for g in MLP_GROUPS]
        return out
    out.append(Target(("mlp.experts",), experts=True))
    if shared is not None:
        out += [Target(tuple(f"mlp.shared_expert.{n}" for n in g)) for g in MLP_GROUPS]
    return out


def disk_name(adapter: Adapter, layer_prefix: str, name: str) -> str:
    """The checkpoint (and vLLM) name of the Linear `name` of the layer at `layer_prefix`."""
    return next(iter(adapter.to_disk({f"{layer_prefix}{name}.weight": torch.empty(0)}))).removesuffix(".weight")


def expert_names(adapter: Adapter, layer_prefix: str, n_experts: int) -> list[tuple[str, str, str]]:
    """Checkpoint names of (gate, up, down) of every expert of a layer."""
    moe = adapter.arch.moe
    assert moe is not None
    base = f"{layer_prefix}{moe.disk_block}.experts"
    return [tuple(f"{base}.{e}.{p}" for p in moe.disk_proj) for e in range(n_experts)]  # type: ignore[misc]


def target_names(adapter: Adapter, prefix: str, t: Target) -> list[list[str]]:
    """Per member of target `t`, the names a pattern may match: its memory and checkpoint names (for an
    experts module: the module and the first expert's gate/up/down)."""
    if t.experts:
        return [[f"{prefix}{t.names[0]}", *expert_names(adapter, prefix, 1)[0]]]
    return [[f"{prefix}{n}", disk_name(adapter, prefix, n)] for n in t.names]


def resolve_ignore(targets: list[Target], adapter: Adapter, prefix: str, patterns: list[str]
                   ) -> tuple[list[Target], set[str]]:
    """(the targets left to quantize, the patterns that matched something). A pattern matches a Linear by
    its memory or its checkpoint name; an experts module is ignored when all its experts' names match.
    Raises ValueError when a pattern splits a group vLLM fuses (q/k/v, gate/up)."""
    used: set[str] = set()
    keep = []
    for t in targets:
        hit: list[str] = []
        if t.experts:  # the experts of a layer are quantized all or none: vLLM runs them as one module
            module, parts = f"{prefix}{t.names[0]}", expert_names(adapter, prefix, 1)[0]
            for p in patterns:
                each = [matches(n, p) for n in parts]
                if matches(module, p) or all(each):
                    hit.append(p)
                elif any(each):
                    raise ValueError(f"ignore {p!r} matches only some expert projections ({', '.join(parts)}); "
                                     "keep a layer's experts all quantized or all unquantized (e.g. 're:.*experts.*')")
        else:
            flags: list[bool] = []
            for n in t.names:
                found = [p for p in patterns if matches(f"{prefix}{n}", p) or
                         matches(disk_name(adapter, prefix, n), p)]
                flags.append(bool(found))
                hit += found
            if any(flags) and not all(flags):
                raise ValueError(f"ignore {sorted(set(hit))} keeps only some of {', '.join(t.names)} unquantized; "
                                 "vLLM fuses them into one matrix and needs all or none quantized")
        used.update(hit)
        if not hit:
            keep.append(t)
    return keep, used


@dataclass(frozen=True)
class QuantFormat:
    """How the quantization stage stores weights (the plan's WeightFormat): bytes on disk per tensor, the
    compressed-tensors layout of every quantized Linear, and what vLLM can do with it."""

    bits: int
    group_size: int
    symmetric: bool
    activation_bits: int | None
    ignore: tuple[str, ...]
    per_channel_fallback: bool
    groups: tuple[tuple[tuple[str, ...], int, int], ...] = ()  # mixed precision: (patterns, bits, group_size)
    mixed: tuple[float, int] | None = None  # automatic: (target_bits, high_bits), resolved when the stage runs

    @classmethod
    def of(cls, cfg: QuantFields) -> QuantFormat:
        groups = tuple((tuple(g.targets), g.bits, g.group_size if g.group_size is not None else cfg.group_size)
                       for g in cfg.groups)
        mixed = (cfg.mixed.target_bits, cfg.mixed.high_bits) if cfg.mixed is not None else None
        return cls(cfg.bits, cfg.group_size, cfg.symmetric, cfg.activation_bits, tuple(cfg.ignore),
                   cfg.per_channel_fallback, groups, mixed)

    def matching(self, names: list[str]) -> int | None:
        """The index of the first mixed-precision group with a pattern matching one of `names`."""
        return next((g for g, (patterns, _, _) in enumerate(self.groups)
                     if any(matches(n, p) for p in patterns for n in names)), None)

    def for_names(self, names: list[str]) -> QuantFormat:
        """The format of a Linear known by `names` (memory and checkpoint names): the stage's, or its group's."""
        g = self.matching(names)
        if g is None:
            return replace(self, groups=()) if self.groups else self
        _, bits, group_size = self.groups[g]
        return replace(self, bits=bits, group_size=group_size, groups=())

    def for_target(self, adapter: Adapter, prefix: str, t: Target) -> QuantFormat:
        """The format of target `t` of the layer at `prefix` (a fused group takes one format: the plan checks
        that its members agree)."""
        if not self.groups:
            return self
        return self.for_names(target_names(adapter, prefix, t)[0])

    def all_bits(self) -> set[int]:
        return {self.bits, *(b for _, b, _ in self.groups), *([self.mixed[1]] if self.mixed else [])}

    def group_for(self, in_features: int) -> int | None:
        """The group size used for a Linear with this input width (-1 per channel), None if it does not fit."""
        if self.group_size == -1 or in_features % self.group_size == 0:
            return self.group_size
        return -1 if self.per_channel_fallback else None

    def linear_bytes(self, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        """Bytes of one quantized [out, in] weight as compressed-tensors stores it."""
        gs = self.group_for(in_features) or -1
        groups = 1 if gs == -1 else in_features // gs
        per_word = 32 // self.bits
        if self.activation_bits == 8:
            weight = out_features * in_features  # int-quantized: int8
        else:
            weight = out_features * math.ceil(in_features / per_word) * 4 + 2 * 8  # int32 words + weight_shape
        scale = out_features * groups * torch.empty((), dtype=dtype).element_size()
        zero = 0 if self.symmetric else math.ceil(out_features / per_word) * groups * 4
        return weight + scale + zero

    def model_bytes(self, model: torch.nn.Module, dtype: torch.dtype) -> int:
        """Bytes on disk of `model` (a meta-device model) with its targets quantized (automatic mixed
        precision: interpolated between all at `bits` and all at `high_bits` by the budget)."""
        if self.mixed is not None:
            target, high = self.mixed
            low_bytes = replace(self, mixed=None).model_bytes(model, dtype)
            high_bytes = replace(self, mixed=None, bits=high).model_bytes(model, dtype)
            return round(low_bytes + (high_bytes - low_bytes) * (target - self.bits) / (high - self.bits))
        adapter = Adapter.for_config(model.config)  # type: ignore[arg-type]
        element = torch.empty((), dtype=dtype).element_size()
        total = sum(p.numel() for p in model.parameters()) * element  # tied weights counted once
        for i, layer in enumerate(adapter.layers(model)):
            prefix = f"model.layers.{i}."
            targets, _ = resolve_ignore(layer_targets(adapter, layer), adapter, prefix, list(self.ignore))
            for t in targets:
                fmt = self.for_target(adapter, prefix, t)
                if t.experts:
                    experts: Any = layer.get_submodule(t.names[0])
                    n, two_i, h = experts.gate_up_proj.shape
                    total -= (experts.gate_up_proj.numel() + experts.down_proj.numel()) * element
                    total += n * (2 * fmt.linear_bytes(two_i // 2, h, dtype) + fmt.linear_bytes(h, two_i // 2, dtype))
                    continue
                for name in t.names:
                    lin: Any = layer.get_submodule(name)
                    total += fmt.linear_bytes(lin.out_features, lin.in_features, dtype) - lin.weight.numel() * element
        return total

    def vllm_limitation(self, gpu: bool) -> str | None:
        """Why vLLM cannot serve this format on a machine with (`gpu`) or without a GPU (None when it can)."""
        bad = sorted(self.all_bits() - set(VLLM_BITS))
        if bad:
            where = "" if self.bits == bad[0] else " (in groups)"
            return (f"vLLM's compressed-tensors kernels take 4 or 8 weight bits, not {bad[0]}{where}: the export loads "
                    "in transformers only; use export.check: transformers")
        bits = self.all_bits() - ({8} if self.activation_bits == 8 else set())
        cpu_bad = sorted(bits - set(vllm_weight_only_bits(gpu)))
        if cpu_bad:
            where = "" if self.bits == cpu_bad[0] else " (in groups)"
            return (f"vLLM's CPU build loads 4-bit weight-only Linears only, not {cpu_bad[0]}-bit{where} (it serves those "
                    "on GPUs): on this machine use export.check: transformers, 4 bits, or W8A8 (activation_bits: 8)")
        return None
