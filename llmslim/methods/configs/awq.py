"""Recipe parameters of `awq` (the method: methods/awq.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import MethodConfig
from .gptq import GRID_FIELDS, QuantFields, check_patterns


class AwqConfig(MethodConfig):
    """Activation-aware scaling: per-input-channel scales searched for the grid of the quantization stage
    that follows, folded into the preceding norm or Linear (the model keeps its architecture)."""

    data: str
    """Calibration source (from `data:`)."""
    bits: Literal[2, 3, 4, 8] = 4
    """Bits of the grid the scales are searched for. Each grid field left out here is taken from the
    quantization stage that follows (its own default when nothing quantizes next); one given here must
    equal that stage's (checked)."""
    group_size: Literal[-1, 32, 64, 128] = 128
    """Group size of that grid (-1: per channel); default: the following stage's."""
    symmetric: bool = True
    """Whether that grid is symmetric; default: the following stage's."""
    per_channel_fallback: bool = False
    """As in gptq: Linears whose input width group_size does not divide are searched per channel; default:
    the following stage's."""
    observer: Literal["minmax", "mse"] = "minmax"
    """The range each group's grid takes during the search; default: the following stage's `observer`."""
    full_range: bool = False
    """Symmetric grids: autoround's full-range scales (the largest-magnitude weight on -2^(bits-1)) instead of
    gptq/rtn's; default: the following stage's (true before an autoround stage that keeps its default)."""
    grid: int = Field(default=20, ge=1, le=200)
    """Exponents a tried per mapping: 0, 1/grid, ..., (grid-1)/grid (plus no scaling)."""
    duo_scaling: bool = True
    """s = mean|x|^a / mean|W|^(1-a) (AutoAWQ's default); false: s = mean|x|^a (the AWQ paper)."""
    objective: Literal["module", "linear"] = "linear"
    """Where a candidate scale's error is measured. linear: at the mapping's own Linears' outputs (q/k/v
    stacked, gate/up stacked). module: at the output of the block they belong to (AutoAWQ's and
    llm-compressor's choice): q/k/v through the whole self-attention (softmax, o_proj in full precision),
    gate/up through the whole MLP (the activation, the product, down_proj); v -> o and up -> down are
    measured at their Linear either way."""
    tokens: int = Field(default=8192, gt=0)
    """Calibration tokens per layer used in the search (a seeded sample of `data`; whole sequences for the
    `module` objective, whose attention mixes a sequence's tokens)."""
    ignore: list[str] = ["lm_head"]
    """The Linears the following stage keeps unquantized (the same patterns, checked): their mappings are
    not scaled, since there is no rounding error to trade."""

    @model_validator(mode="after")
    def _patterns(self) -> AwqConfig:
        check_patterns([(f"ignore[{i}]", p) for i, p in enumerate(self.ignore)])
        return self

    def before(self, following: MethodConfig | None) -> AwqConfig:
        """The grid fields this stage leaves out, from the quantization stage that follows: awq then searches
        on exactly the grid that stage rounds to (the plan checks the fields given here)."""
        if not isinstance(following, QuantFields):
            return self
        given = self.model_fields_set
        taken = {f: getattr(following, f, False) for f in GRID_FIELDS if f not in given}  # full_range: gptq has none
        return type(self).model_validate({**self.model_dump(include=given), **taken}) if taken else self

