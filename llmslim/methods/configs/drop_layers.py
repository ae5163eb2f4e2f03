"""Recipe parameters of `drop_layers` (the method: methods/drop_layers.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import MethodConfig


class DropLayersConfig(MethodConfig):
    """Remove whole decoder layers: give `layers` explicitly, or a `count` and a `criterion`."""

    count: int | None = Field(default=None, gt=0)
    """How many layers to remove (chosen by `criterion`)."""
    layers: list[int] | None = None
    """Exactly which layers to remove (0-based indices); overrides `criterion`."""
    criterion: Literal["block_influence", "angular", "last", "random"] = "block_influence"
    """How `count` layers are chosen: block_influence (ShortGPT), angular (Gromov et al.), last (the
    layers before the final one) or random (seeded baseline)."""
    data: str | None = None
    """Calibration source (from `data:`) for block_influence and angular."""

    @model_validator(mode="after")
    def _check(self) -> DropLayersConfig:
        if (self.count is None) == (self.layers is None):
            raise ValueError("give exactly one of 'count' (with a criterion) or 'layers' (explicit indices)")
        if self.layers is not None and not self.layers:
            raise ValueError("'layers' is empty: list at least one layer index")
        if self.count is not None and self.criterion in DATA_CRITERIA and self.data is None:
            raise ValueError(f"criterion '{self.criterion}' measures the model on text: set 'data' to a "
                             "source from data:, or use criterion 'last' or 'random'")
        return self

    def data_source(self) -> str | None:
        return self.data if self.layers is None and self.criterion in DATA_CRITERIA else None


DATA_CRITERIA = ("block_influence", "angular")

