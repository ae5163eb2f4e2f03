"""Recipe parameters of `prune_heads` (the method: methods/prune_heads.py)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from .base import MethodConfig
from .structured import DATA_CRITERIA, Criterion, check_criterion, refuse_per_layer


class PruneHeadsConfig(MethodConfig):
    """Remove attention heads: give `kv_heads` (the count to keep) or `ratio` (the fraction to remove).
    Qwen2 models are written as LlamaForCausalLM (vLLM's Qwen2 derives head_dim from hidden_size / heads;
    Llama with attention_bias reads it from the config and computes the same); Qwen2-MoE cannot lose heads."""

    kv_heads: int | None = Field(default=None, gt=0)
    """KV heads to keep in every layer; their query heads stay with them (heads / kv_heads is unchanged)."""
    ratio: float | None = Field(default=None, gt=0, lt=1)
    """Fraction of heads to remove in every layer, in whole KV groups: kept KV heads = kv * (1 - ratio)
    rounded to the nearest (halves remove more); must keep at least one and remove at least one."""
    criterion: Criterion = "activation"
    """How heads are ranked: activation (Minitron), magnitude (weights only), taylor (LLM-Pruner; whole
    model in memory) or random (seeded baseline)."""
    data: str | None = None
    """Calibration source (from `data:`) for activation and taylor."""

    @field_validator("kv_heads", "ratio", mode="before")
    @classmethod
    def _uniform(cls, v: Any) -> Any:
        return refuse_per_layer(v, "head counts")

    @model_validator(mode="after")
    def _check(self) -> PruneHeadsConfig:
        if (self.kv_heads is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'kv_heads' (KV heads to keep) or 'ratio' (fraction to remove)")
        check_criterion(self.criterion, self.data)
        return self

    def data_source(self) -> str | None:
        return self.data if self.criterion in DATA_CRITERIA else None

