"""Recipe parameters of `prune_experts` and `set_topk` (the methods: methods/experts.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import MethodConfig

ExpertCriterion = Literal["frequency", "gate_weight", "reap", "random"]


class PruneExpertsConfig(MethodConfig):
    """Remove experts from every MoE layer: give `keep` (experts per layer) or `ratio` (fraction removed)."""

    keep: int | None = Field(default=None, gt=0)
    """Experts each MoE layer keeps (the same in every layer)."""
    ratio: float | None = Field(default=None, gt=0, lt=1)
    """Fraction of experts to remove: keep = round(experts * (1 - ratio)), halves toward removing more."""
    criterion: ExpertCriterion = "reap"
    """How experts are ranked per layer: frequency, gate_weight, reap (router-weighted output norm) or random."""
    data: str | None = None
    """Calibration source (from `data:`) for every criterion but random."""

    @model_validator(mode="after")
    def _check(self) -> PruneExpertsConfig:
        if (self.keep is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'keep' (experts per layer) or 'ratio' (fraction to remove)")
        if self.criterion != "random" and self.data is None:
            raise ValueError(f"criterion '{self.criterion}' measures routing on text: set 'data' to a source from "
                             "data:, or use criterion 'random'")
        return self

    def data_source(self) -> str | None:
        return self.data if self.criterion != "random" else None



class SetTopkConfig(MethodConfig):
    """Change how many experts each token uses (num_experts_per_tok)."""

    top_k: int = Field(gt=0)
    """Experts per token; at most the model's expert count."""
    norm_topk_prob: bool | None = None
    """Qwen2-MoE / Qwen3-MoE: divide the top-k weights by their sum (null: keep the model's setting).
    Mixtral always does; false is refused there."""

