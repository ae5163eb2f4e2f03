"""The layer-by-layer runner: calibration work that never needs the whole model's activations.

Layer 0's inputs (hidden states plus the keyword arguments a decoder layer takes: position embeddings,
masks, positions) are captured once by running the embeddings with layer 0 replaced by a catcher. Then
each layer in turn is materialised, calibrated on those inputs, edited, and run again to produce the
next layer's inputs. Memory: one layer's weights plus two copies of the calibration activations
([samples, seq_len, hidden] each), whatever the model's depth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoint import LazyModel


class _Caught(Exception):
    """Raised by the catcher to stop the forward pass once layer 0's inputs are recorded."""


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, sink: list[tuple[torch.Tensor, dict[str, Any]]]):
        super().__init__()
        self.layer = layer
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("decoder layers are expected to take keyword arguments after hidden_states")
        self.sink.append((hidden_states, kwargs))
        raise _Caught


@dataclass
class LayerInputs:
    """Calibration activations entering one decoder layer, in batches, with the kwargs layers need."""

    hidden: list[torch.Tensor]  # each [batch, seq_len, hidden]
    kwargs: list[dict[str, Any]] = field(repr=False)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def capture_inputs(lazy: LazyModel, tokens: torch.Tensor, *, batch_size: int = 8,
                   device: torch.device | str = "cpu") -> LayerInputs:
    """Layer 0's inputs for calibration tokens [N, S] (embeddings run; no decoder layer is loaded)."""
    device = torch.device(device)
    model = lazy.model
    layers = lazy.layers
    sink: list[tuple[torch.Tensor, dict[str, Any]]] = []
    first = layers[0]
    layers[0] = _Catcher(first, sink)
    embed = model.get_input_embeddings()
    embed.to(device)
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        rotary.to(device)
    try:
        for batch in tokens.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        layers[0] = first
        embed.to("cpu")
        if rotary is not None:
            rotary.to("cpu")
    hidden = [h for h, _ in sink]
    kwargs = [{k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")} for _, kw in sink]
    return LayerInputs(hidden, kwargs)


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden-state output, whichever return convention the architecture uses."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """Run one decoder layer on every calibration batch; returns the outputs (the next layer's inputs)."""
    return [layer_output(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]


@torch.no_grad()
def forward_layer(layer: nn.Module, inputs: LayerInputs) -> None:
    """Run one decoder layer on every batch for its side effects (hooks collecting statistics)."""
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        layer(h, **kw)


@dataclass
class Step:
    """One layer of a walk: the caller calibrates/edits `layer` on `inputs`. It may set `outputs` (e.g.
    when it already ran the final layer on the inputs); otherwise the walk runs the layer, as edited,
    to make the next layer's inputs (sequential: layer i+1 sees what edited layer i produces)."""

    index: int
    layer: nn.Module
    inputs: LayerInputs
    outputs: list[torch.Tensor] | None = None


def walk(lazy: LazyModel, inputs: LayerInputs, *, device: torch.device | str = "cpu",
         release: bool = True) -> Iterator[Step]:
    """Walk the decoder layers in order: each is materialised on `device`, handed to the caller with the
    calibration activations entering it, then (after the caller is done) run to produce the next
    layer's inputs and released from memory."""
    device = torch.device(device)
    inputs = LayerInputs(_to(inputs.hidden, device), _to(inputs.kwargs, device))
    for i in range(len(lazy.layers)):
        step = Step(i, lazy.materialize(i).to(device), inputs)
        yield step
        outputs = step.outputs if step.outputs is not None else run_layer(step.layer, inputs)
        inputs = LayerInputs(outputs, inputs.kwargs)
        del step
        if release:
            lazy.release(i)
