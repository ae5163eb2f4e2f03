"""What the structured pruning methods' parameters share (prune_heads, prune_ffn; their driver is
methods/structured.py): the criteria and the checks on them."""

from __future__ import annotations

from typing import Any, Literal

Criterion = Literal["activation", "magnitude", "taylor", "random"]
DATA_CRITERIA = ("activation", "taylor")


def refuse_per_layer(value: Any, what: str) -> Any:
    """Field validator body: a list or mapping asks for per-layer (non-uniform) sizes, which we refuse."""
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"per-layer (non-uniform) {what} are not supported: vLLM and transformers build every "
                         "layer from one number in config.json, so every layer keeps the same size; give a "
                         "single number")
    return value


def check_criterion(criterion: str, data: str | None) -> None:
    if criterion in DATA_CRITERIA and data is None:
        raise ValueError(f"criterion '{criterion}' measures the model on text: set 'data' to a source from "
                         "data:, or use criterion 'magnitude' or 'random'")
