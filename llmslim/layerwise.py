"""The layer-by-layer runner: calibration work that never needs the whole model's activations.

Layer 0's inputs (hidden states plus the keyword arguments a decoder layer takes: position embeddings,
masks, positions) are captured once by running the embeddings with every layer replaced by a catcher. Then
each layer in turn is materialised, calibrated on those inputs, edited, and run again to produce the
next layer's inputs. Memory: one layer's weights plus two copies of the calibration activations
([samples, seq_len, hidden] each), whatever the model's depth.

The keyword arguments can differ between layers: Gemma 3 (and sliding-window Qwen2/3) give sliding-window
layers another mask, and Gemma 3 another rotary base, than global ones. Each catcher records what its layer
is given; layers given the very same objects share one variant, so memory holds each distinct mask once.
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
    """Stands in for decoder layer `index`: records its inputs and passes the hidden states on unchanged
    (the last one stops the forward pass: nothing after the layers is needed)."""

    def __init__(self, layer: nn.Module, index: int, last: bool, sink: list[tuple[int, torch.Tensor, dict[str, Any]]]):
        super().__init__()
        self.layer, self.index, self.last, self.sink = layer, index, last, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("decoder layers are expected to take keyword arguments after hidden_states")
        self.sink.append((self.index, hidden_states, kwargs))
        if self.last:
            raise _Caught
        return hidden_states


@dataclass
class LayerInputs:
    """Calibration activations entering one decoder layer, in batches, with the kwargs that layer needs."""

    hidden: list[torch.Tensor]  # each [batch, seq_len, hidden]
    kwargs: list[dict[str, Any]] = field(repr=False)  # per batch, for the layer these inputs enter
    # When layers take different kwargs: the distinct variants (each per batch) and each layer's variant.
    variants: list[list[dict[str, Any]]] | None = field(default=None, repr=False)
    variant_of: list[int] | None = None

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def for_layer(self, index: int, hidden: list[torch.Tensor] | None = None) -> LayerInputs:
        """The inputs entering decoder layer `index`: `hidden` (default: these) with that layer's kwargs."""
        kwargs = self.kwargs
        if self.variants is not None and self.variant_of is not None:
            kwargs = self.variants[self.variant_of[index]]
        return LayerInputs(self.hidden if hidden is None else hidden, kwargs, self.variants, self.variant_of)


def _to(x: Any, device: torch.device, memo: dict[int, torch.Tensor]) -> Any:
    """`x` (tensors in tuples, lists, dicts) on `device`; a tensor met twice is moved once (memo by id)."""
    if isinstance(x, torch.Tensor):
        if id(x) not in memo:
            memo[id(x)] = x.to(device)
        return memo[id(x)]
    if isinstance(x, tuple):
        return tuple(_to(v, device, memo) for v in x)
    if isinstance(x, list):
        return [_to(v, device, memo) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device, memo) for k, v in x.items()}
    return x


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two layers were given the very same objects (the model computes each mask once per kind)."""
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _variants(per_layer: list[list[dict[str, Any]]]) -> tuple[list[list[dict[str, Any]]], list[int]]:
    """per_layer[layer][batch] -> the distinct per-batch kwargs lists and each layer's index among them."""
    variants: list[list[dict[str, Any]]] = []
    variant_of: list[int] = []
    for kws in per_layer:
        found = next((j for j, v in enumerate(variants) if all(_same(a, b) for a, b in zip(v, kws))), None)
        if found is None:
            variants.append(kws)
            found = len(variants) - 1
        variant_of.append(found)
    return variants, variant_of


@torch.no_grad()
def capture_inputs(lazy: LazyModel, tokens: torch.Tensor, *, batch_size: int = 8,
                   device: torch.device | str = "cpu") -> LayerInputs:
    """Layer 0's inputs for calibration tokens [N, S] (embeddings run; no decoder layer is loaded), with
    every layer's kwargs (`LayerInputs.for_layer`)."""
    device = torch.device(device)
    model = lazy.model
    layers = lazy.layers
    sink: list[tuple[int, torch.Tensor, dict[str, Any]]] = []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, i, i == len(originals) - 1, sink)
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
        for i, layer in enumerate(originals):
            layers[i] = layer
        embed.to("cpu")
        if rotary is not None:
            rotary.to("cpu")
    hidden = [h for i, h, _ in sink if i == 0]
    per_layer: list[list[dict[str, Any]]] = [[] for _ in originals]
    for i, _, kw in sink:
        per_layer[i].append({k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")})
    variants, variant_of = _variants(per_layer)
    if len(variants) == 1:  # every layer takes the same kwargs (Llama, Qwen, Mixtral...)
        return LayerInputs(hidden, variants[0])
    return LayerInputs(hidden, variants[variant_of[0]], variants, variant_of)


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
    memo: dict[int, torch.Tensor] = {}
    inputs = LayerInputs(_to(inputs.hidden, device, memo), _to(inputs.kwargs, device, memo),
                         _to(inputs.variants, device, memo), inputs.variant_of)
    for i in range(len(lazy.layers)):
        inputs = inputs.for_layer(i)  # layer i's own mask and position embeddings (sliding or global)
        step = Step(i, lazy.materialize(i).to(device), inputs)
        yield step
        outputs = step.outputs if step.outputs is not None else run_layer(step.layer, inputs)
        inputs = inputs.for_layer(i, outputs)
        del step
        if release:
            lazy.release(i)
