"""Recipe parameters of `gptq` and `rtn`, and what the plan needs to know about their output: which
weights get quantized (`QuantFormat.targets`), how many bytes that takes on disk, and whether vLLM can
serve the result.

Which weights: every Linear of the decoder layers (attention q/k/v/o, MLP gate/up/down, the shared
expert of Qwen2-MoE) and every MoE expert's gate/up/down, minus `ignore`. Never quantized: embeddings,
lm_head, norms, MoE routers and Qwen2-MoE's 1-row `shared_expert_gate` (vLLM builds those unquantized too).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ...adapters import Adapter
from ...cpu import vllm_weight_only_bits
from ...registry import MethodConfig

# Linears that share their input: one Hessian serves the whole group (names relative to a decoder layer).
ATTENTION_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
MLP_GROUPS = (("gate_proj", "up_proj"), ("down_proj",))
VLLM_BITS = (4, 8)  # vLLM's WNA16 kernels take 4 and 8 bits; its int8 W8A8 path takes 8


class QuantGroup(MethodConfig):
    """Mixed precision: Linears matching `targets` take this group's bits and group_size."""

    targets: list[str] = Field(min_length=1)
    """Name patterns as in `ignore`: a suffix (`down_proj`, `model.layers.0.mlp.down_proj`) or `re:REGEX`."""
    bits: Literal[2, 3, 4, 8]
    """Weight bits of the matching Linears."""
    group_size: Literal[-1, 32, 64, 128] | None = None
    """Their group size; default: the stage's."""


class MixedConfig(MethodConfig):
    """Automatic mixed precision: two bit widths under an average budget (see methods/mixed.py)."""

    target_bits: float = Field(gt=0)
    """Average weight bits over all quantized Linears, between the stage's `bits` and `high_bits`."""
    high_bits: Literal[4, 8] = 8
    """The wider width given to the targets where a measured sensitivity says it matters most."""


class QuantFields(MethodConfig):
    """Parameters shared by gptq and rtn: the integer grid and what it applies to."""

    bits: Literal[2, 3, 4, 8] = 4
    """Weight bits. vLLM serves 4 and 8; 2 and 3 export and load in transformers only."""
    group_size: Literal[-1, 32, 64, 128] = 128
    """Input columns sharing one scale; -1: one scale per output channel."""
    symmetric: bool = True
    """Symmetric grid (zero point 0, not stored); false: min-max grid with a zero point per group."""
    activation_bits: Literal[8] | None = None
    """8: W8A8, int8 activations quantized per token at inference (needs bits 8, symmetric, group_size
    -1; dense models on vLLM's CPU build); null: weight-only (W{bits}A16)."""
    ignore: list[str] = ["lm_head"]
    """Linear modules to keep unquantized: a name suffix (`down_proj`, `model.layers.0.mlp.down_proj`) or
    `re:` plus a regex matched against the whole name. Embeddings, lm_head, norms and MoE routers are
    never quantized."""
    observer: Literal["minmax", "mse"] = "minmax"
    """How each group's range is chosen: minmax (the weights' range, as llm-compressor's default), or mse
    (the range shrunk by the factor in 1.00, 0.99, ..., 0.21 that minimises the group's squared rounding
    error, weighted by the Hessian diagonal under gptq)."""
    per_channel_fallback: bool = False
    """Quantize per output channel the Linears whose input width `group_size` does not divide (instead of
    refusing the recipe), e.g. a 172-wide down_proj with group_size 128."""
    groups: list[QuantGroup] = []
    """Mixed precision: `[{targets: [down_proj], bits: 8}, ...]`; the first group whose pattern matches a
    Linear sets its bits (and group_size); the others take the stage's. Exported as one compressed-tensors
    config group per scheme. Linears vLLM fuses (q/k/v, gate/up) must land in the same group."""

    mixed: MixedConfig | None = None
    """Automatic mixed precision (gptq, autoround): `{target_bits: 4.5}` gives `high_bits` (default 8) to the
    Linears whose round-to-nearest output error (measured on the calibration tokens) drops most per extra
    bit, until the average over all quantized weights reaches target_bits; the rest keep `bits`."""

    @model_validator(mode="after")
    def _grid(self) -> QuantFields:
        if self.activation_bits == 8 and (self.bits != 8 or not self.symmetric or self.group_size != -1):
            raise ValueError("activation_bits 8 (W8A8) needs bits: 8, symmetric: true and group_size: -1, the "
                             f"scheme vLLM's int8 kernels run; found bits {self.bits}, symmetric {self.symmetric}, "
                             f"group_size {self.group_size}")
        if self.activation_bits == 8 and (self.groups or self.mixed):
            raise ValueError("mixed precision (groups, mixed) is weight-only: W8A8 takes one scheme for every Linear")
        if self.mixed is not None:
            if self.groups:
                raise ValueError("give either groups (by hand) or mixed (automatic), not both")
            if not self.bits < self.mixed.high_bits:
                raise ValueError(f"mixed.high_bits {self.mixed.high_bits} must be above bits {self.bits}")
            if not self.bits < self.mixed.target_bits < self.mixed.high_bits:
                raise ValueError(f"mixed.target_bits {self.mixed.target_bits:g} must lie between bits {self.bits} and "
                                 f"mixed.high_bits {self.mixed.high_bits}")
        check_patterns([(f"ignore[{i}]", p) for i, p in enumerate(self.ignore)]
                       + [(f"groups[{g}].targets[{i}]", p) for g, grp in enumerate(self.groups)
                          for i, p in enumerate(grp.targets)])
        return self


class GptqConfig(QuantFields):
    """GPTQ (Frantar et al. 2022): each Linear quantized column by column, the rounding error of each column
    compensated on the columns not yet quantized through the inverse Hessian of the layer's real inputs.
    Decoder layer by decoder layer: each layer is calibrated on what the already-quantized layers before
    it produce; within a layer the Hessians of all its Linears come from one pass of the unquantized
    layer (layer-sequential, not the module-sequential order of the GPTQ paper's code)."""

    act_order: bool = True
    """Quantize columns by decreasing Hessian diagonal (most-used inputs first). With groups, each column
    keeps its original group's scale (static groups, what vLLM loads; no g_idx)."""
    dampening: float = Field(default=0.01, ge=0, lt=1)
    """Added to the Hessian's diagonal, as a fraction of its mean (raised x10 if H is still singular)."""
    block_size: int = Field(default=128, gt=0)
    """Columns per lazy-update block: changes speed, not the algorithm (floating-point sums are reordered:
    the integers came out identical for block sizes 1 to 1000 in the tests, scales within float rounding)."""
    gptaq: bool = False
    """Asymmetric calibration (GPTAQ, Li et al. 2025): fit each Linear's quantized weight to what the
    full-precision model computes on its own inputs, compensating the error of the quantized layers before
    it too (dense models; one more pass of each layer and a second copy of the calibration activations)."""
    expert_min_tokens: int = Field(default=64, ge=0)
    """MoE: an expert that the router sends fewer calibration tokens than this is calibrated on every
    token of the batch instead (all-experts calibration), so that no expert is quantized blind."""
    data: str
    """Calibration source (from `data:`): `samples` windows of `seq_len` tokens."""


class RtnConfig(QuantFields):
    """Round-to-nearest on the same grid as gptq, without data: the baseline GPTQ is measured against."""

    @model_validator(mode="after")
    def _no_mixed(self) -> RtnConfig:
        if self.mixed is not None:
            raise ValueError("mixed measures sensitivity on calibration data, which rtn does not read: use gptq "
                             "(or groups for a hand-made allocation)")
        return self


# The fields of a quantization stage that define the grid it rounds to: what an awq stage before it searches
# its scales on (awq takes the same fields; the plan checks every one; `groups`/`mixed` are refused after awq).
GRID_FIELDS = ("bits", "group_size", "symmetric", "observer", "per_channel_fallback", "full_range", "ignore")


@dataclass(frozen=True)
class Grid:
    """The round-to-nearest grid of a quantization stage (its start, for gptq's error feedback and autoround's
    learned rounding): bits, group size, symmetry, how each group's range is observed, per-channel fallback,
    autoround's full-range symmetric scales, and the Linears left unquantized."""

    bits: int
    group_size: int
    symmetric: bool
    observer: str
    per_channel_fallback: bool
    full_range: bool  # symmetric grids only: the largest-magnitude weight on -2^(bits-1) (autoround)
    ignore: tuple[str, ...]

    @classmethod
    def of(cls, cfg: Any) -> Grid:
        """The grid of a gptq/rtn/autoround/qat config, or of an awq config (the same field names); configs
        without `full_range` (gptq, rtn, qat) round on the half-range grid."""
        return cls(cfg.bits, cfg.group_size, cfg.symmetric, cfg.observer, cfg.per_channel_fallback,
                   bool(getattr(cfg, "full_range", False)) and cfg.symmetric, tuple(cfg.ignore))

    def differs(self, other: Grid) -> str | None:
        """The first field (GRID_FIELDS order) in which two grids differ; ignore lists compare as sets."""
        for name in GRID_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if (sorted(a) != sorted(b)) if name == "ignore" else (a != b):
                return name
        return None


def check_patterns(patterns: list[tuple[str, str]]) -> None:
    """Refuse a `re:` pattern that does not compile, naming where it is (field, pattern)."""
    for where, pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(f"{where}: {pattern!r} is not a valid regex ({e})") from None


def matches(name: str, pattern: str) -> bool:
    """Whether module `name` matches an ignore pattern: `re:` regex (whole name) or a dotted suffix."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


# ---------------------------------------------------------------- what gets quantized


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
