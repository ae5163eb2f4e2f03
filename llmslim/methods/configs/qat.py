"""Recipe parameters of `qat` (the method: methods/qat.py): training fields (training/config.py) plus the
quantization grid (configs/gptq.py)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from ...training.config import TrainFields
from .eora import Rank
from .gptq import QuantFields

VLLM_RANKS = get_args(Rank)  # the adapter ranks vLLM's --max-lora-rank takes (and sensible ones)


class QatConfig(TrainFields, QuantFields):
    """Quantization-aware training with LoRA: on the export grid (`base: grid`, exported exactly as trained),
    or QLoRA on a 4-bit NormalFloat base (`base: nf4`, merged for a following gptq/rtn stage). With `merge:
    false` the adapters stay apart: a quantized base (base nf4: the dense input weights, for the quantizing
    stage that follows) plus a LoRA adapter vLLM serves per request."""

    base: Literal["grid", "nf4"] = "grid"
    """grid: train on the integer grid the stage exports (bits, group_size, symmetric, ignore); nf4:
    bitsandbytes NF4 base weights with double quantization (QLoRA), merged and written dense (merge: false:
    the input's weights written dense, the adapter apart)."""
    init: Literal["rtn", "gptq"] = "gptq"
    """How W0 and the grid's scales start (base grid): round to nearest, or GPTQ on `calib_data`."""
    calib_data: str | None = None
    """Calibration source for init: gptq (its `samples` windows); null: `data`."""
    learn_scales: bool = False
    """Train the grid's scales too (LSQ-style, kept positive as exp of a learned log-scale)."""
    trainable: Literal["all", "lora"] = "lora"
    """QAT trains LoRA adapters (the base weights stay frozen on the grid or in NF4)."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate (AdamW) of the adapters (and scales)."""
    merge: bool = True
    """true: the adapters are merged into the weights (base grid: training and export use Q(W0 + (alpha/r) B A),
    one model, best quality per byte). false: the adapters are written apart, as a PEFT LoRA adapter in `qat/`
    that vLLM serves unmerged (`--enable-lora`); lora.r must then be one of 8, 16, 32, 64, 128, 256. Base
    grid: the base integers stay frozen, training computes Q(W0) x + (alpha/r) B A x, and the export is that
    quantized base plus the adapter. Base nf4: the stage writes the input's dense weights W0 plus the adapter
    (trained over NF4); only a quantizing stage (gptq, rtn, autoround) may follow, which keeps the adapter
    beside its grid (the notes measure how far that grid and NF4 move W0). After a sparsity stage only base
    grid with merge: true keeps its zeros (the others are refused)."""

    @model_validator(mode="after")
    def _check_qat(self) -> QatConfig:
        if self.trainable != "lora":
            raise ValueError("qat trains LoRA adapters on frozen quantized weights: trainable must be lora")
        if self.groups or self.mixed:
            raise ValueError("mixed precision (groups, mixed) is for gptq, rtn and autoround; qat trains one grid")
        if self.lora.dropout:
            raise ValueError("lora.dropout must be 0 for qat: the forward uses the merged weight, where dropout on "
                             "the adapters' input does not exist")
        if self.base == "nf4" and (self.bits != 4 or self.group_size != 128 or not self.symmetric
                                   or self.activation_bits or self.learn_scales or self.init != "gptq"
                                   or self.observer != "minmax"):
            raise ValueError("base nf4 is bitsandbytes' 4-bit NormalFloat with its own blocks: bits, group_size, "
                             "symmetric, activation_bits, observer, learn_scales and init apply to base grid only; leave "
                             "them out (the grid is chosen by the gptq/rtn stage that follows)")
        if not self.merge and self.lora.r not in VLLM_RANKS:
            raise ValueError(f"merge: false writes an adapter vLLM serves: lora.r must be one of "
                             f"{', '.join(map(str, VLLM_RANKS))} (got {self.lora.r}), or use merge: true")
        return self

    def data_sources(self) -> list[str]:
        return super().data_sources() + ([self.calib_data] if self.calib_data else [])

