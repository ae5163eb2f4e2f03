"""Finished decoder layers as files in a stage's scratch directory: how the layer-by-layer stages (gptq,
rtn, moefy, prune_experts) resume after a kill. A layer counts as done once its file is complete; a rerun
restores the done layers from their files (bit for bit what the first run held) and only re-runs them to
rebuild the next layer's calibration activations. At the end the files become the export's shards."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import save_safetensors

log = logging.getLogger(__name__)


def layer_file(scratch: Path, index: int) -> Path:
    return scratch / f"layer-{index:05d}.safetensors"


def save_layer(path: Path, tensors: dict[str, torch.Tensor], notes: dict[str, Any]) -> None:
    # The notes go beside the layer, not into its safetensors metadata: the file becomes a shard of the
    # export, and safetensors writes metadata keys in a different order in every process (a hash map),
    # which would make the export differ byte for byte between a resumed run and an uninterrupted one.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(notes))
    tmp = path.with_suffix(".tmp")
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)  # a layer counts as done only once its tensors are complete (notes are written first)


def load_layer(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    notes = json.loads(path.with_suffix(".json").read_text())
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, notes


def done_layers(ctx: Any, n: int, verb: str) -> list[int]:
    """The layers an earlier run of this stage finished (its files in `ctx.scratch_dir`), said in the log."""
    done = [i for i in range(n) if layer_file(ctx.scratch_dir, i).is_file()]
    if done:
        first_todo = next((i for i in range(n) if i not in done), n)
        log.info("%s: %d of %d layers were %s by an earlier run; continuing at layer %d",
                 ctx.stage.label, len(done), n, verb, first_todo)
    return done


def write_export(ctx: Any, config: Any, n: int) -> None:
    """The stage's output checkpoint: the input's tensors outside the decoder layers, then the `n` finished
    layer files of `ctx.scratch_dir` as shards (linked, not copied, where the filesystem allows)."""
    from .adapters import layer_of

    src = ctx.source
    writer = ctx.writer()
    writer.add(src.read([k for k in src.names if layer_of(k) is None], ctx.dtype))
    for i in range(n):
        writer.adopt(layer_file(ctx.scratch_dir, i))
    writer.close(config)
