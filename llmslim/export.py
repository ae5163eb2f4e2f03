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
from .formats.compressed import scheme_of, stored_shapes
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


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` where the filesystem allows, else a copy."""
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
            link_or_copy(f, dst / f.name)
        shutil.copy2(ckpt.path / "config.json", dst / "config.json")
        copy_lora_adapter(ckpt.path, dst)
        return
    writer = CheckpointWriter(dst, max_shard_bytes=max_shard_bytes)
    writer.add(ckpt.read([n for n in ckpt.names if layer_of(n) is None], dtype))
    for i in range(ckpt.config.num_hidden_layers):
        writer.add(ckpt.read(ckpt.layer_names(i), dtype))
    config = ckpt.config
    config.dtype = dtype
    writer.close(config)
    copy_lora_adapter(ckpt.path, dst)


def copy_lora_adapter(src: Path, dst: Path) -> None:
    """A LoRA adapter folder beside the weights (eora's, qat's) travels with them, unchanged."""
    from .formats.lora import adapter_dir

    folder = adapter_dir(src)
    if folder is not None:
        (dst / folder.name).mkdir(exist_ok=True)
        for f in folder.iterdir():
            link_or_copy(f, dst / folder.name / f.name)


def verify_shapes(model_dir: Path, *, allow_extra: bool = False) -> int:
    """Check every tensor in a model directory against the shapes its config.json implies; returns the
    number of tensors checked. A quantized (compressed-tensors) Linear is held to its recorded
    `weight_shape` and every stored tensor of it (packed weight, scale, zero point, g_idx) to what its
    quantization scheme implies for that shape. Raises ExportError naming the first mismatch, or any
    tensor the config does not describe (unless `allow_extra`: a source checkpoint may carry extras that
    transformers ignores)."""
    ckpt = Checkpoint(model_dir)
    config = ckpt.config
    model = meta_model(config, torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = ckpt.adapter.to_disk({k: v for k, v in model.state_dict().items()
                                     if not (tied and k == "lm_head.weight")})
    found = ckpt.shapes()
    quantized = {n[: -len(".weight_scale")] for n in found if n.endswith(".weight_scale")}
    qconfig = getattr(config, "quantization_config", None)
    if quantized and qconfig is None:
        raise ExportError(f"{model_dir}: {sorted(quantized)[0]} is stored quantized but config.json has no "
                          "quantization_config")
    qdict = qconfig if isinstance(qconfig, dict) else (qconfig.to_dict() if qconfig is not None else {})
    recorded = {}
    shape_names = [n + ".weight_shape" for n in quantized if n + ".weight_shape" in found]
    if shape_names:
        recorded = {n[: -len("_shape")]: tuple(int(x) for x in t.tolist()) for n, t in ckpt.read(shape_names).items()}
    for name, tensor in expected.items():
        want = tuple(tensor.shape)
        got = found.get(name) or recorded.get(name)
        if got is None:
            raise ExportError(f"{model_dir}: tensor {name} is missing (config.json implies shape {list(want)})")
        if tuple(got) != want:
            raise ExportError(f"{model_dir}: tensor {name} has shape {list(got)} but config.json implies {list(want)}")
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base in quantized:
            _verify_quantized(model_dir, base, want, qdict, found)
    stray = [n for n in found if n not in expected and not (
        n.rsplit(".", 1)[-1] in QUANT_PARAMS and n.rsplit(".", 1)[0] in quantized)]
    if stray and not allow_extra:
        raise ExportError(f"{model_dir}: tensors not described by config.json: {stray[:4]}")
    return len(expected)


def _verify_quantized(model_dir: Path, base: str, shape: tuple[int, ...], qconfig: dict,
                      found: dict[str, tuple[int, ...]]) -> None:
    """Every stored tensor of the quantized Linear `base` has the shape its scheme implies."""
    try:
        scheme = scheme_of(base, qconfig)
    except ValueError as e:
        raise ExportError(f"{model_dir}: {e}") from None
    want = stored_shapes(shape[0], shape[1], scheme, has_g_idx=f"{base}.weight_g_idx" in found)
    for key, dims in want.items():
        got = found.get(f"{base}.{key}")
        if got is None:
            raise ExportError(f"{model_dir}: tensor {base}.{key} is missing (its quantization scheme implies "
                              f"shape {list(dims)})")
        if tuple(got) != dims:
            raise ExportError(f"{model_dir}: tensor {base}.{key} has shape {list(got)} but W{scheme.bits} "
                              f"{scheme.strategy} quantization of a {list(shape)} weight implies {list(dims)}")
    extra = [k for k in QUANT_PARAMS + ("weight",) if f"{base}.{k}" in found and k not in want]
    if extra:
        raise ExportError(f"{model_dir}: tensor {base}.{extra[0]} is not part of its quantization scheme "
                          f"(W{scheme.bits} {scheme.format}, {'' if scheme.symmetric else 'a'}symmetric)")


def weight_bytes(path: Path) -> int:
    """Bytes of the safetensors files in a model directory."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
