"""What a method's handler is given (StageContext) and what it hands back (StageResult).

A stage reads its input checkpoint (`ctx.source`) and writes a complete checkpoint to `ctx.out_dir`.
Most methods use one of two helpers: `ctx.lazy_model()` + `ctx.writer()` to stream layer by layer, or
`ctx.lazy_model().materialize_all()` + `ctx.save(model)` when they need the whole model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from .checkpoint import Checkpoint, CheckpointWriter, LazyModel, save_model
from .data import DataHub
from .layerwise import LayerInputs, capture_inputs
from .plan import PlanState
from .progress import Progress
from .recipe import Recipe, Stage

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """A finished stage: the config it wrote and what the report should say about it."""

    config: PretrainedConfig | dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)
    peak_note: str = ""  # e.g. "whole model in memory" — stated in the report next to peak memory


@dataclass
class StageContext:
    recipe: Recipe
    stage: Stage
    source: Checkpoint
    out_dir: Path
    scratch_dir: Path  # survives a crash of this stage (per-layer resume state); removed once it completes
    dtype: torch.dtype  # what the stage writes
    device: torch.device
    data: DataHub
    progress: Progress
    before: PlanState
    after: PlanState
    max_shard_bytes: int = 2 * 10**9
    compute_dtype: torch.dtype | None = None  # layers and activations in memory; None: `dtype`
    original: Checkpoint | None = None  # the recipe's model as loaded before the first stage (a teacher)
    unquantized: Checkpoint | None = None  # the input of the quantizing stage (Method.follows_quantization)
    history: list[dict[str, Any]] = field(default_factory=list)  # records of the stages before this one
    is_main_process: bool = True  # False on the other processes of `accelerate launch`: they write nothing

    @property
    def seed(self) -> int:
        return self.recipe.spec.seed

    def lazy_model(self) -> LazyModel:
        """The input model with decoder layers left on disk until materialised, in the compute dtype."""
        return LazyModel(self.source, self.compute_dtype or self.dtype)

    def writer(self) -> CheckpointWriter:
        return CheckpointWriter(self.out_dir, max_shard_bytes=self.max_shard_bytes)

    def save(self, model: torch.nn.Module) -> None:
        """Write a whole in-memory model as this stage's output checkpoint."""
        save_model(model, self.source.adapter, self.out_dir, max_shard_bytes=self.max_shard_bytes)

    def calibration_tokens(self) -> torch.Tensor:
        name = self.stage.config.data_source()
        assert name is not None, "stage has no data source"
        return self.data.calibration(name)

    def calibration_inputs(self, lazy: LazyModel, batch_size: int = 8) -> LayerInputs:
        """Layer 0's inputs for this stage's calibration windows."""
        tokens = self.calibration_tokens()
        log.info("%s: calibrating on %d x %d tokens", self.stage.label, *tokens.shape)
        return capture_inputs(lazy, tokens, batch_size=batch_size, device=self.device)
