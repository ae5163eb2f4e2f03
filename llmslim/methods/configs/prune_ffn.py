"""Recipe parameters of `prune_ffn` (the method: methods/prune_ffn.py)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from .base import MethodConfig
from .structured import DATA_CRITERIA, Criterion, check_criterion, refuse_per_layer


class PruneFfnConfig(MethodConfig):
    """Remove FFN channels: give `intermediate_size` (the width to keep) or `ratio` (the fraction to remove)."""

    intermediate_size: int | None = Field(default=None, gt=0)
    """Width to keep in every layer: the MLP's for dense models, each expert's for MoE models (the shared
    expert and dense layers of an MoE model shrink by the same fraction). Must be a multiple of
    `multiple_of`."""
    ratio: float | None = Field(default=None, gt=0, lt=1)
    """Fraction of channels to remove: the new width is width * (1 - ratio), rounded to the nearest
    multiple of `multiple_of` (halves down, never 0)."""
    multiple_of: int = Field(default=64, ge=1)
    """Widths are multiples of this, so quantization groups and kernels tile them evenly."""
    criterion: Criterion = "activation"
    """How channels are ranked: activation (Minitron), magnitude (weights only), taylor (LLM-Pruner; whole
    model in memory) or random (seeded baseline)."""
    data: str | None = None
    """Calibration source (from `data:`) for activation and taylor."""

    @field_validator("intermediate_size", "ratio", mode="before")
    @classmethod
    def _uniform(cls, v: Any) -> Any:
        return refuse_per_layer(v, "FFN widths")

    @model_validator(mode="after")
    def _check(self) -> PruneFfnConfig:
        if (self.intermediate_size is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'intermediate_size' (width to keep) or 'ratio' (fraction to remove)")
        check_criterion(self.criterion, self.data)
        return self

    def data_source(self) -> str | None:
        return self.data if self.criterion in DATA_CRITERIA else None

