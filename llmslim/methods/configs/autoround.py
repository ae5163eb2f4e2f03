"""Recipe parameters of `autoround` (the method: methods/autoround.py)."""

from __future__ import annotations

from pydantic import Field, model_validator

from .gptq import QuantFields


class AutoRoundConfig(QuantFields):
    """Learned rounding offsets and clipping ranges per decoder layer, trained by signed gradient descent
    on the layer's output error; exported on the grid of `bits`/`group_size`/`symmetric` like gptq."""

    data: str
    """Calibration source (from `data:`)."""
    iters: int = Field(default=200, gt=0)
    """Signed-gradient steps per decoder layer, each on one calibration batch (8 windows)."""
    lr: float | None = Field(default=None, gt=0)
    """Step size (in integer steps for the offsets); default 1 / iters, decaying linearly to 0."""
    full_range: bool = True
    """Symmetric grids: each group's largest-magnitude weight on -2^(bits-1) (its scale negative when that
    weight is positive), a finer step than gptq/rtn's grid in the same format; false: gptq/rtn's grid (the
    start is then exactly rtn's). Asymmetric grids use their whole range already and ignore this."""

    @model_validator(mode="after")
    def _autoround(self) -> AutoRoundConfig:
        if self.activation_bits is not None:
            raise ValueError("autoround is weight-only: activation_bits must stay null")
        if self.observer != "minmax":
            raise ValueError("observer: autoround learns each group's clipping range itself; leave observer "
                             "at minmax (the mse observer is for gptq and rtn)")
        return self

