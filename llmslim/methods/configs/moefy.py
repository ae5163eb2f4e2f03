"""Recipe parameters of `moefy` (the method: methods/moefy.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import MethodConfig


class MoefyConfig(MethodConfig):
    """Split every dense FFN into `experts` routed experts (and an optional shared expert), `top_k` active
    per token, with a router fitted on calibration activations."""

    experts: int = Field(gt=1)
    """Routed experts per layer; the FFN width (less `shared`) must divide evenly by it."""
    top_k: int = Field(gt=0)
    """Experts each token uses (num_experts_per_tok); at most `experts`."""
    shared: int = Field(default=0, ge=0)
    """FFN channels kept as an always-on shared expert (exported as Qwen2-MoE); 0: none (Mixtral/Qwen3-MoE)."""
    split: Literal["balanced_cluster", "cluster", "random"] = "balanced_cluster"
    """How channels are grouped: balanced k-means of activation patterns, k-means made equal-size at the
    end, or a seeded random split."""
    data: str
    """Calibration source (from `data:`): activations for the split and the router."""
    tokens: int = Field(default=8192, gt=0)
    """Calibration tokens per layer used for clustering and the router (a seeded sample of `data`)."""

    @model_validator(mode="after")
    def _check(self) -> MoefyConfig:
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} is more than experts {self.experts}: a token can use at most "
                             "every expert")
        return self

