"""Recipe parameters of `eora` (the method: methods/eora/)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from .base import MethodConfig
from .gptq import check_patterns

# The LoRA ranks vLLM's `max_lora_rank` accepts that are also sensible corrections (vLLM also takes 1, 320, 512).
Rank = Literal[8, 16, 32, 64, 128, 256]


class EoraConfig(MethodConfig):
    """EoRA (Liu et al. 2024): after a quantizing stage, each quantized Linear's error W - Q(W) is approximated
    at low rank where its calibration inputs have energy (in the eigenspace of their second moment XᵀX/n),
    and written beside the quantized model as a PEFT LoRA adapter (`eora/` in the export) that vLLM serves
    with `--enable-lora`. The quantized base is unchanged; the adapter restores part of what rounding lost."""

    data: str
    """Calibration source (from `data:`): the inputs whose second moment weighs each Linear's error."""
    rank: Rank = 32
    """The adapter's rank for every quantized Linear (scaling 1: lora_alpha = rank)."""
    ranks: dict[str, Rank] = {}
    """Per-Linear overrides: `{down_proj: 64}`; a key is a name suffix (`down_proj`,
    `model.layers.0.mlp.down_proj`) or `re:` plus a regex on the whole name; the first key that matches wins."""

    @model_validator(mode="after")
    def _patterns(self) -> EoraConfig:
        check_patterns([(f"ranks[{k!r}]", k) for k in self.ranks])
        return self
