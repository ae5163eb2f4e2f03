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

from ..layerwise import run_layer, walk
from .gptq.config import MixedConfig, disk_name
from .gptq.core import rtn_quantize

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
def second_moments(lazy: Any, inputs: Any, targets: list[list[Any]], device: Any) -> list[dict[tuple[str, ...], Tensor]]:
    """E[x_j^2] of every target's input, per layer, on the unquantized model (one forward walk)."""
    out: list[dict[tuple[str, ...], Tensor]] = []
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
        out.append({k: (v[0] / max(v[1], 1)).cpu() for k, v in sums.items()})
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
        moments = second_moments(lazy, ctx.calibration_inputs(lazy), targets, ctx.device)
        items, gains, costs = [], [], []
        total = 0
        for i, ts in enumerate(targets):
            layer = lazy.materialize(i)
            for t in ts:
                W = torch.cat([layer.get_submodule(n).weight.float() for n in t.names])
                gs = fmt.group_for(W.shape[1]) or -1
                low = sensitivity(W, moments[i][t.names], fmt.bits, gs, fmt.symmetric)
                high = sensitivity(W, moments[i][t.names], mixed.high_bits, gs, fmt.symmetric)
                items.append([disk_name(ctx.source.adapter, f"model.layers.{i}.", n) for n in t.names])
                gains.append(low - high)
                costs.append(W.numel() * (mixed.high_bits - fmt.bits))
                total += W.numel()
            lazy.release(i)
        budget = total * (mixed.target_bits - fmt.bits)
        chosen = allocate(gains, costs, budget)
        upgraded = [n for names, c in zip(items, chosen) if c for n in names]
        bits = (total * fmt.bits + sum(c for c, k in zip(costs, chosen) if k)) / total
        saved = {"upgraded": upgraded, "average_bits": round(bits, 4), "targets": len(items),
                 "targets_upgraded": sum(chosen)}
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(saved))
    log.info("mixed precision: %d of %d targets at %d bits, average %.3f bits", saved["targets_upgraded"],
             saved["targets"], mixed.high_bits, saved["average_bits"])
    if not saved["upgraded"]:
        return fmt, saved
    patterns = tuple(f"re:^{n.replace('.', '[.]')}$" for n in saved["upgraded"])
    return replace(fmt, groups=((patterns, mixed.high_bits, fmt.group_size),)), saved
