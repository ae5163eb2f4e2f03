"""Checkpoints on disk: reading tensors lazily, materialising one decoder layer at a time, and writing
safetensors shards incrementally. This is what keeps host memory bounded: a stage never needs more
than the layer it works on plus the embeddings, unless it asks for the whole model."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .adapters import Adapter, layer_of
from .errors import UserError
from .memory import keep_large_buffers_out_of_the_heap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"
# Files that travel with a model but are not weights.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class Checkpoint:
    """A model directory: config.json plus safetensors weights (one file or an index of shards)."""

    def __init__(self, path: str | Path, *, trust_remote_code: bool = False):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise UserError(f"{self.path}: not a model directory (no config.json)")
        self.config: PretrainedConfig = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        self.adapter = Adapter.for_config(self.config, str(self.path))
        self._files = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        """Tensor name -> file, from the shard index or the single file. Every file's header is opened here,
        so a missing, truncated or corrupt file is one clear error before any work starts."""
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            files = {k: self.path / v for k, v in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise UserError(f"{file}: missing: {INDEX_FILE} lists it for {sum(f == file for f in files.values())} "
                                    "tensor(s); the download or copy of this model is incomplete")
                names = set(_open_keys(file))
                absent = [k for k, f in files.items() if f == file and k not in names]
                if absent:
                    raise UserError(f"{file}: does not hold {absent[0]}, which {INDEX_FILE} says it does "
                                    f"({len(absent)} such tensor(s)); the shards and the index do not match")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return {k: single for k in _open_keys(single)}
        raise UserError(f"{self.path}: no safetensors weights (model.safetensors or {INDEX_FILE})")

    @property
    def names(self) -> list[str]:
        return list(self._files)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint declares (config `dtype`), else that of its first float tensor."""
        declared = declared_dtype(self.config)
        if declared is not None:
            return declared
        for name in self._files:
            t = self.read([name])[name]
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the safetensors headers (no data read)."""
        out = {}
        for file, names in _by_file(self._files, self._files).items():
            with safe_open(file, "pt") as f:
                for n in names:
                    out[n] = tuple(f.get_slice(n).get_shape())
        return out

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read the named tensors (floating-point ones cast to `dtype` when given)."""
        out: dict[str, torch.Tensor] = {}
        for file, group in _by_file(list(names), self._files).items():
            with safe_open(file, "pt") as f:
                for n in group:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def read_dense(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Like `read`, with compressed-tensors Linears (a quantized checkpoint) decoded to dense weights."""
        tensors = self.read(names, dtype)
        qconfig = getattr(self.config, "quantization_config", None)
        if qconfig is None:
            return tensors
        from .formats.compressed import densify

        return densify(tensors, qconfig if isinstance(qconfig, dict) else qconfig.to_dict(), dtype)

    def layer_names(self, index: int) -> list[str]:
        return [n for n in self._files if layer_of(n) == index]


def _open_keys(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header; a truncated or corrupt file is a UserError."""
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError)
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"{file}: not a readable safetensors file ({reason}); it is truncated or corrupt: "
                        "download or save the model again") from None


def _by_file(names: Iterable[str], files: dict[str, Path]) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for n in names:
        if n not in files:
            raise KeyError(n)
        groups.setdefault(files[n], []).append(n)
    return groups


def _tie(model: Any, config: PretrainedConfig) -> None:
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight


class LazyModel:
    """A transformers model built from a checkpoint with its decoder layers left on the meta device until
    `materialize(i)` reads them from disk; `release(i)` frees them again. Embeddings, final norm and
    lm_head are loaded up front (the layer-by-layer runner needs them to make layer 0's inputs)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, *, config: PretrainedConfig | None = None):
        keep_large_buffers_out_of_the_heap()  # else glibc's heap grows by about a layer per layer walked
        self.ckpt = ckpt
        self.adapter = ckpt.adapter
        self.dtype = dtype
        config = copy_config(config or ckpt.config, dtype)
        with init_empty_weights(include_buffers=False):  # buffers (rotary inv_freq) are built for real
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.config = self.model.config
        outside = [n for n in ckpt.names if layer_of(n) is None and not _is_tied_head(n, self.config)]
        self._assign("", self.adapter.from_disk(ckpt.read_dense(outside, dtype)))
        _tie(self.model, self.config)
        self.layers = self.adapter.layers(self.model)

    def _assign(self, prefix: str, state: dict[str, torch.Tensor]) -> None:
        target = self.model.get_submodule(prefix[:-1]) if prefix else self.model
        local = {k[len(prefix):]: v for k, v in state.items()}
        expected = {k for k in target.state_dict() if not (not prefix and _is_tied_head(k, self.config))}
        if prefix == "":
            expected = {k for k in expected if layer_of(k) is None}
        missing, unexpected = expected - set(local), set(local) - expected
        if missing or unexpected:
            raise UserError(f"{self.ckpt.path}: weights do not match config.json"
                            f"{' (at ' + prefix[:-1] + ')' if prefix else ''}: missing "
                            f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        target.load_state_dict(local, strict=False, assign=True)

    def is_materialized(self, index: int) -> bool:
        return not any(p.is_meta for p in self.layers[index].parameters())

    def materialize(self, index: int) -> nn.Module:
        """Read decoder layer `index` from disk into memory (no-op when it already is)."""
        if not self.is_materialized(index):
            names = self.ckpt.layer_names(index)
            self._assign(f"model.layers.{index}.", self.adapter.from_disk(self.ckpt.read_dense(names, self.dtype)))
        return self.layers[index]

    def release(self, index: int) -> None:
        """Drop decoder layer `index`'s weights from memory (back to the meta device)."""
        self.layers[index].to("meta")

    def materialize_all(self) -> nn.Module:
        """Load every layer: the whole model in memory, for stages that need it (training, gradients)."""
        for i in range(len(self.layers)):
            self.materialize(i)
        return self.model


def _is_tied_head(name: str, config: PretrainedConfig) -> bool:
    return name == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))


def declared_dtype(config: PretrainedConfig) -> torch.dtype | None:
    """The dtype a config declares (`dtype`, as a torch dtype or its name), or None."""
    declared = getattr(config, "dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return DTYPES.get(declared) if isinstance(declared, str) else None


def copy_config(config: PretrainedConfig, dtype: torch.dtype) -> PretrainedConfig:
    """A copy of `config` that records `dtype` as the weights' dtype."""
    new = PretrainedConfig.from_dict(config.to_dict()) if type(config) is PretrainedConfig else \
        type(config).from_dict(config.to_dict())
    new.dtype = dtype
    if hasattr(new, "quantization_config"):  # the in-memory model is dense (a quantized checkpoint is decoded)
        del new.quantization_config
    return new


def parse_size(text: str) -> int:
    """'2GB' -> bytes (decimal units, like transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except ValueError:
                break
    raise UserError(f"export.max_shard_size: found {text!r}; expected a size like 500MB or 2GB")


class CheckpointWriter:
    """Writes tensors into safetensors shards as they come (each shard flushed once it is full), then the
    shard index and config.json on `close()`. Memory held: at most one shard's worth of tensors."""

    def __init__(self, path: str | Path, *, max_shard_bytes: int = 2 * 10**9):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue tensors (checkpoint names) for writing; flushes a shard when the buffer is full."""
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
                self._flush()
            self._buffer[name] = t.detach().to("cpu").contiguous()
            self._buffer_bytes += size
            self.total_bytes += size

    def add_state(self, adapter: Adapter, state: dict[str, torch.Tensor], config: PretrainedConfig) -> None:
        """Queue an in-memory state dict (memory names), converted to the checkpoint layout."""
        state = {k: v for k, v in state.items() if not _is_tied_head(k, config)}
        self.add(adapter.to_disk(state))

    def adopt(self, file: str | Path) -> None:
        """Take a complete safetensors file (checkpoint names) as the next shard, linked rather than copied
        when the filesystem allows, so the source file stays valid until the caller removes it."""
        self._flush()
        number = len(self._shards) + 1
        target = self.path / f"part-{number:05d}.safetensors"
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)
        with safe_open(str(target), "pt") as f:
            names = list(f.keys())
            self.total_bytes += sum(_slice_bytes(f.get_slice(n)) for n in names)
        self._shards.append(names)

    def _flush(self) -> None:
        if not self._buffer:
            return
        number = len(self._shards) + 1
        save_safetensors(self._buffer, self.path / f"part-{number:05d}.safetensors")
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self, config: PretrainedConfig | dict) -> None:
        """Write the last shard, name the shards as transformers does, write the index and config.json."""
        self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._shards, start=1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.path / f"part-{i:05d}.safetensors", self.path / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if isinstance(config, dict):
            (self.path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            config.save_pretrained(self.path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures (full disk, file-size limits) raised as the OSError
    they are, naming the file: safetensors reports them as its own error type with the errno in the text."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    except Exception as e:
        text = str(e)
        m = re.search(r"os error (\d+)", text)
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _slice_bytes(sl: Any) -> int:
    """Bytes of a tensor from its safetensors header (shape and dtype), without reading it."""
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * _DTYPE_BYTES[sl.get_dtype()]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def save_model(model: Any, adapter: Adapter, path: str | Path, *, max_shard_bytes: int = 2 * 10**9) -> None:
    """Write a whole in-memory model as a checkpoint (layer by layer, through CheckpointWriter)."""
    writer = CheckpointWriter(path, max_shard_bytes=max_shard_bytes)
    writer.add_state(adapter, model.state_dict(), model.config)
    writer.close(model.config)


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer files and generation_config.json from one model directory to another."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
