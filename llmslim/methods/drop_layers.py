"""drop_layers: remove whole decoder layers.

Which layers: an explicit list, or `count` layers chosen by a criterion measured on calibration tokens,
one decoder layer at a time:
- block_influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), the
  similarity of layer i's input and output hidden states; the `count` lowest-BI layers go.
- angular (Gromov et al. 2024): the block of `count` consecutive layers whose first input and last output
  are closest in angular distance arccos(cos)/pi, measured on each window's last token.
- last: the `count` layers just before the final one (which Gromov et al. find essential), no data.
- random: `count` layers drawn with the recipe's seed (never the final one), the baseline for the others.
The surgery itself streams: kept layers are copied tensor by tensor and renumbered, never loaded as modules.
Models that mix sliding-window and global attention layers (Gemma 3) keep each kept layer's kind
(`layer_types`); the notes and the log say which kind each dropped layer was.
"""

from __future__ import annotations

import logging
import math

import torch

from ..adapters import layer_of
from ..layerwise import run_layer, walk
from ..plan import PlanError, PlanState
from ..stage import StageContext, StageResult
from .configs.drop_layers import DropLayersConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure cores: scores -> layers


def cosine_per_token(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching hidden vectors, [..., H] x [..., H] -> [...], in float32."""
    return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """arccos(cos(x, y)) / pi per vector: 0 for parallel, 1 for opposite."""
    return torch.arccos(cosine_per_token(x, y).clamp(-1.0, 1.0)) / math.pi


def lowest_influence(influence: list[float], count: int) -> list[int]:
    """The `count` layers with the smallest block influence (ties: the later layer goes first)."""
    order = sorted(range(len(influence)), key=lambda i: (influence[i], -i))
    return sorted(order[:count])


def best_block(distance_by_start: list[float], count: int) -> list[int]:
    """The `count` consecutive layers starting where the angular distance is smallest."""
    start = min(range(len(distance_by_start)), key=lambda s: distance_by_start[s])
    return list(range(start, start + count))


# ---------------------------------------------------------------- glue


def _measure(ctx: StageContext) -> tuple[list[float], list[torch.Tensor]]:
    """Per-layer block influence and the last-token hidden state at every layer boundary."""
    lazy = ctx.lazy_model()
    inputs = ctx.calibration_inputs(lazy)
    influence: list[float] = []
    boundaries = [torch.cat([h[:, -1] for h in inputs.hidden]).float().cpu()]  # [N, H] per boundary
    with ctx.progress.track(f"{ctx.stage.label}: scoring layers", len(lazy.layers)) as task:
        for step in walk(lazy, inputs, device=ctx.device):
            outputs = run_layer(step.layer, step.inputs)
            cos = torch.cat([cosine_per_token(a, b).flatten() for a, b in zip(step.inputs.hidden, outputs)])
            influence.append(1.0 - cos.mean().item())
            boundaries.append(torch.cat([h[:, -1] for h in outputs]).float().cpu())
            step.outputs = outputs
            task.advance()
    return influence, boundaries


def choose_layers(ctx: StageContext, cfg: DropLayersConfig, n_layers: int) -> tuple[list[int], dict]:
    if cfg.layers is not None:
        return sorted(cfg.layers), {}
    assert cfg.count is not None
    if cfg.criterion == "last":
        return list(range(n_layers - 1 - cfg.count, n_layers - 1)), {}
    if cfg.criterion == "random":
        g = torch.Generator().manual_seed(ctx.seed)
        return sorted(torch.randperm(n_layers - 1, generator=g)[: cfg.count].tolist()), {}
    influence, boundaries = _measure(ctx)
    notes: dict = {"block_influence": [round(v, 6) for v in influence]}
    if cfg.criterion == "block_influence":
        return lowest_influence(influence, cfg.count), notes
    distance = [angular_distance(boundaries[s], boundaries[s + cfg.count]).mean().item()
                for s in range(n_layers - cfg.count + 1)]
    notes["angular_distance_by_start"] = [round(v, 6) for v in distance]
    return best_block(distance, cfg.count), notes


def run(ctx: StageContext, cfg: DropLayersConfig) -> StageResult:
    src = ctx.source
    n = src.config.num_hidden_layers
    drop, notes = choose_layers(ctx, cfg, n)
    keep = [i for i in range(n) if i not in drop]
    config = src.adapter.with_layers(src.config, keep)
    kinds = {str(i): src.adapter.layer_kind(src.config, i) for i in drop}
    if any(kinds.values()):  # sliding-window and global layers (Gemma 3): say which kind went
        notes = {**notes, "dropped_kinds": kinds}
        log.info("%s: dropping %s", ctx.stage.label, ", ".join(f"layer {i} ({k} attention)" for i, k in kinds.items()))
    writer = ctx.writer()
    writer.add(src.read([k for k in src.names if layer_of(k) is None], ctx.dtype))
    with ctx.progress.track(f"{ctx.stage.label}: writing kept layers", len(keep)) as task:
        for new, old in enumerate(keep):
            old_prefix, new_prefix = f"model.layers.{old}.", f"model.layers.{new}."
            tensors = src.read(src.layer_names(old), ctx.dtype)
            writer.add({new_prefix + k[len(old_prefix):]: t for k, t in tensors.items()})
            task.advance()
    config.dtype = ctx.dtype
    writer.close(config)
    return StageResult(config, {"dropped": drop, "kept": keep, **notes})


def plan(state: PlanState, cfg: DropLayersConfig) -> PlanState:
    n = state.config.num_hidden_layers
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < n]
        if bad:
            raise PlanError("layers", f"layer {bad[0]} does not exist; the model has {n} layers (0-{n - 1})")
        if len(set(cfg.layers)) != len(cfg.layers):
            raise PlanError("layers", f"duplicate layer indices in {cfg.layers}")
        drop = set(cfg.layers)
    else:
        assert cfg.count is not None
        limit = n - 2 if cfg.criterion in ("last", "random") else n - 1
        if cfg.count > limit:
            raise PlanError("count", f"cannot drop {cfg.count} of {n} layers with criterion '{cfg.criterion}'; "
                                     f"at most {limit}")
        drop = set(range(cfg.count))  # which ones is decided on data; the shape only needs how many
    if len(drop) >= n:
        raise PlanError("layers", f"dropping {len(drop)} layers would leave none of {n}")
    return state.with_config(state.adapter.with_layers(state.config, [i for i in range(n) if i not in drop]))
