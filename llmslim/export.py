"""Export: the final checkpoint plus tokenizer, generation config, recipe and report, written to a
temporary directory, verified, checked, and only then renamed into place. A crashed or failed run
never leaves a directory at `output` that looks finished."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .adapters import layer_of
from .checkpoint import INDEX_FILE, Checkpoint, CheckpointWriter
from .errors import UserError
from .plan import meta_model

log = logging.getLogger(__name__)


QUANT_PARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


class ExportError(UserError):
    """The export does not match its own config (a bug in a stage, caught before anything is shipped)."""


def weight_files(ckpt: Checkpoint) -> list[Path]:
    files = sorted({ckpt.path / f for f in _relative_files(ckpt)})
    if (ckpt.path / INDEX_FILE).is_file():
        files.append(ckpt.path / INDEX_FILE)
    return files


def _relative_files(ckpt: Checkpoint) -> set[str]:
    index = ckpt.path / INDEX_FILE
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"].values())
    return {"model.safetensors"}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: no second copy of multi-GB shards
    except OSError:
        shutil.copy2(src, dst)


def write_weights(ckpt: Checkpoint, dst: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Put `ckpt`'s weights and config into `dst` in `dtype`: linked/copied as they are when the dtype
    already matches, else rewritten layer by layer (memory: one layer)."""
    dst.mkdir(parents=True, exist_ok=True)
    quantized = getattr(ckpt.config, "quantization_config", None) is not None
    if quantized or ckpt.dtype == dtype:
        for f in weight_files(ckpt):
            _link_or_copy(f, dst / f.name)
        shutil.copy2(ckpt.path / "config.json", dst / "config.json")
        return
    writer = CheckpointWriter(dst, max_shard_bytes=max_shard_bytes)
    writer.add(ckpt.read([n for n in ckpt.names if layer_of(n) is None], dtype))
    for i in range(ckpt.config.num_hidden_layers):
        writer.add(ckpt.read(ckpt.layer_names(i), dtype))
    config = ckpt.config
    config.dtype = dtype
    writer.close(config)


def verify_shapes(model_dir: Path) -> int:
    """Check every tensor in the export against the shapes its config.json implies; returns the number of
    tensors checked. Quantized (compressed-tensors) weights are checked through their recorded
    `weight_shape`. Raises ExportError naming the first mismatch."""
    ckpt = Checkpoint(model_dir)
    config = ckpt.config
    model = meta_model(config, torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = ckpt.adapter.to_disk({k: v for k, v in model.state_dict().items()
                                     if not (tied and k == "lm_head.weight")})
    found = ckpt.shapes()
    quant_shapes = {}
    shape_names = [n for n in found if n.endswith(".weight_shape")]
    if shape_names:
        quant_shapes = {n[: -len("_shape")]: tuple(int(x) for x in t.tolist())
                        for n, t in ckpt.read(shape_names).items()}
    for name, tensor in expected.items():
        want = tuple(tensor.shape)
        got = found.get(name) or quant_shapes.get(name)
        if got is None:
            raise ExportError(f"{model_dir}: tensor {name} is missing (config.json implies shape {list(want)})")
        if tuple(got) != want:
            raise ExportError(f"{model_dir}: tensor {name} has shape {list(got)} but config.json implies {list(want)}")
    # compressed-tensors keeps a quantized Linear's parameters beside (int-quantized) or instead of
    # (pack-quantized, checked through weight_shape above) its weight
    stray = [n for n in found if n not in expected and not (
        n.rsplit(".", 1)[-1] in QUANT_PARAMS and n.rsplit(".", 1)[0] + ".weight" in expected)]
    if stray:
        raise ExportError(f"{model_dir}: tensors not described by config.json: {stray[:4]}")
    return len(expected)


def finalize(tmp: Path, output: Path, trash: Path) -> None:
    """Atomically move the finished export `tmp` to `output` (an older export there is replaced)."""
    if trash.exists():
        shutil.rmtree(trash)
    if output.exists():
        os.replace(output, trash)
    os.replace(tmp, output)
    if trash.exists():
        shutil.rmtree(trash)

