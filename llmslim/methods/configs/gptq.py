"""Recipe parameters of `gptq` and `rtn`, shared by every quantizer (autoround, qat, and awq's grid fields):
the integer grid, what it applies to, mixed precision. What the plan needs to know about the output (which
weights get quantized, bytes on disk, whether vLLM serves it) is in methods/gptq/format.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import MethodConfig


class QuantGroup(MethodConfig):
    """Mixed precision: Linears matching `targets` take this group's bits and group_size."""

    targets: list[str] = Field(min_length=1)
    """Name patterns as in `ignore`: a suffix (`down_proj`, `model.layers.0.mlp.down_proj`) or `re:REGEX`."""
    bits: Literal[2, 3, 4, 8]
    """Weight bits of the matching Linears."""
    group_size: Literal[-1, 32, 64, 128] | None = None
    """Their group size; default: the stage's."""


class MixedConfig(MethodConfig):
    """Automatic mixed precision: two bit widths under an average budget (see methods/gptq/mixed.py)."""

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
