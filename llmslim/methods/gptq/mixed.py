"""Automatic mixed precision (`mixed: {target_bits: B}` on gptq and autoround): spend the extra bits where
a measured sensitivity says they buy the most.

Unit: a target of a decoder layer (q/k/v together, o, gate/up together, down: what vLLM fuses shares a
precision). Sensitivity of a target at b bits: sum_j E[x_j^2] * sum_rows (W - Q_b(W))_j^2, the output error
of round-to-nearest on the stage's grid under a diagonal approximation of the input covariance (E[x_j^2]
measured on the calibration tokens, the model unquantized). Each target starts at the stage's `bits`; a
target moved to `high_bits` gains gain = sens(bits) - sens(high_bits) and costs params * (high - bits) bits.
Targets are upgraded by gain per bit, best first, while the average over all quantized weights stays
within `target_bits` (a knapsack solved greedily: every upgrade of a 7B model costs a sliver of the budget,
so what greedy leaves on the table is small).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...layerwise import run_layer, walk
from ...workspace import write_json_atomic
from ..configs.gptq import MixedConfig
from .core import rtn_quantize
from .format import disk_name

log = logging.getLogger(__name__)


def sensitivity(W: Tensor, second_moment: Tensor, bits: int, group_size: int, symmetric: bool) -> float:
    """sum_j E[x_j^2] sum_rows (W - rtn_b(W))_j^2 for W [out, in] and E[x^2] [in]."""
    err = (W.float() - rtn_quantize(W.float(), bits=bits, group_size=group_size, symmetric=symmetric).weight)
    return float((err.pow(2).sum(0) * second_moment.float()).sum())


def allocate(gains: list[float], costs: list[int], budget: float) -> list[bool]:
    """Which items to upgrade: by gain per unit cost, best first, each taken if it still fits the budget."""
    order = sorted(range(len(gains)), key=lambda i: gains[i] / max(costs[i], 1), reverse=True)
    chosen, spent = [False] * len(gains), 0.0
    for i in order:
        if gains[i] > 0 and spent + costs[i] <= budget:
            chosen[i] = True
            spent += costs[i]
    return chosen


@torch.no_grad()
def measure(lazy: Any, inputs: Any, targets: list[list[Any]], fmt: Any, high_bits: int, device: Any
            ) -> list[tuple[int, Any, float, int]]:
    """(layer, target, gain = sensitivity at fmt.bits - at high_bits, weights) of every target, in one
    forward walk of the unquantized model: each layer's input second moments are measured and its
    weights scored while the layer is in memory."""
    out: list[tuple[int, Any, float, int]] = []
    for step in walk(lazy, inputs, device=device):
        sums: dict[tuple[str, ...], list[Any]] = {}
        handles = []
        for t in targets[step.index]:
            lin: Any = step.layer.get_submodule(t.names[0])
            sums[t.names] = [torch.zeros(lin.in_features, device=device), 0]

            def hook(_m: Any, args: tuple, acc: list[Any] = sums[t.names]) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                acc[0] += x.pow(2).sum(0)
                acc[1] += x.shape[0]
            handles.append(lin.register_forward_pre_hook(hook))
        try:
            step.outputs = run_layer(step.layer, step.inputs)
        finally:
            for h in handles:
                h.remove()
        for t in targets[step.index]:
            moment = sums[t.names][0] / max(sums[t.names][1], 1)
            lins: list[Any] = [step.layer.get_submodule(n) for n in t.names]
            W = torch.cat([lin.weight.float() for lin in lins])
            gs = fmt.group_for(W.shape[1]) or -1
            gain = (sensitivity(W, moment, fmt.bits, gs, fmt.symmetric)
                    - sensitivity(W, moment, high_bits, gs, fmt.symmetric))
            out.append((step.index, t, gain, W.numel()))
    return out


def plan_groups(ctx: Any, lazy: Any, targets: list[list[Any]], fmt: Any, cfg: Any) -> tuple[Any, dict[str, Any]]:
    """The stage's format with the upgraded targets as one group (exact names), and the allocation's notes.
    Stored in the stage's scratch directory: a resumed run uses the same allocation."""
    from dataclasses import replace

    mixed: MixedConfig = cfg.mixed
    file = Path(ctx.scratch_dir) / "mixed-allocation.json"
    if file.is_file():
        saved = json.loads(file.read_text())
    else:
        scored = measure(lazy, ctx.calibration_inputs(lazy), targets, fmt, mixed.high_bits, ctx.device)
        items = [[disk_name(ctx.source.adapter, f"model.layers.{i}.", n) for n in t.names] for i, t, _, _ in scored]
        gains = [gain for _, _, gain, _ in scored]
        costs = [numel * (mixed.high_bits - fmt.bits) for _, _, _, numel in scored]
        total = sum(numel for _, _, _, numel in scored)
        budget = total * (mixed.target_bits - fmt.bits)
        chosen = allocate(gains, costs, budget)
        upgraded = [n for names, c in zip(items, chosen) if c for n in names]
        bits = (total * fmt.bits + sum(c for c, k in zip(costs, chosen) if k)) / total
        saved = {"upgraded": upgraded, "average_bits": round(bits, 4), "targets": len(items),
                 "targets_upgraded": sum(chosen)}
        write_json_atomic(file, saved)  # a kill mid-write must not leave half a file for the rerun to trust
    log.info("mixed precision: %d of %d targets at %d bits, average %.3f bits", saved["targets_upgraded"],
             saved["targets"], mixed.high_bits, saved["average_bits"])
    if not saved["upgraded"]:
        return fmt, saved
    patterns = tuple(f"re:^{n.replace('.', '[.]')}$" for n in saved["upgraded"])
    return replace(fmt, groups=((patterns, mixed.high_bits, fmt.group_size),)), saved
