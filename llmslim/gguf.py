"""GGUF input: a llama.cpp file converted once into the safetensors checkpoint every stage reads.

What the field's libraries do, they do here: the `gguf` package reads the file (memory-mapped) and
dequantizes each tensor; transformers' GGUF tables turn the metadata into a config and a tokenizer (chat
template and special tokens included), map llama.cpp's tensor names to transformers' and undo llama.cpp's
q/k row permutation (its per-architecture tensor processors). What they lack is written here:

- one tensor at a time: transformers' own GGUF loading dequantizes the whole model into memory (an 8B
  model: 32 GB in float32) and its result refuses `save_pretrained`. Here each tensor is dequantized,
  processed, cast to the working dtype and appended to a shard file, then dropped; host memory is the
  largest tensor (in float32) plus one copy, whatever the model's size.
- a checkpoint transformers and vLLM load as it is: `architectures` and `dtype` set, generation config.
- resume: shards are planned from the file alone and each is renamed into place complete, so a rerun
  after a kill skips the shards that exist and the conversion is only renamed to its final name whole.
- one-line errors: not a GGUF, truncated, an architecture or tensor type that cannot be read, no tokenizer.

The weights keep llama.cpp's rounding (e.g. Q4_1: asymmetric 4-bit in blocks of 32 with fp16 scales and
minimums): a conversion is the quantized model in floating point, not the original model. `auto` picks
float32 for quantized files, where every dequantized value is exact; float16/bfloat16 for files whose
matrices are stored that way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .faults import crash_point
from .memory import PeakMemory, keep_large_buffers_out_of_the_heap, rss_bytes
from .progress import Progress

log = logging.getLogger(__name__)

RECORD = "llmslim_source.json"  # in a conversion: what it was converted from, and the key a rerun compares
FORMAT_VERSION = 1  # bump when the conversion's output changes, so older conversions are redone
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file holds, read from its header (no tensor data)."""

    path: Path
    architecture: str
    file_type: str
    """llama.cpp's name for the file's main quantization (general.file_type), e.g. MOSTLY_Q4_1."""
    tensor_types: dict[str, int] = field(default_factory=dict)
    """Tensors per storage type, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
    matrix_types: dict[str, int] = field(default_factory=dict)
    """The same for tensors of two or more dimensions (the weights quantization touches)."""

    def short(self) -> str:
        """e.g. GGUF Q4_1: what the plan's first row says."""
        return f"GGUF {self.file_type.removeprefix('MOSTLY_').removeprefix('ALL_')}"

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(self.matrix_types.items(), key=lambda kv: -kv[1]))
        return f"{self.short()} ({kinds} matrices)"

    @property
    def quantized(self) -> bool:
        return any(t not in ("F32", "F16", "BF16") for t in self.matrix_types)

    def natural_dtype(self) -> torch.dtype:
        """The dtype that holds every dequantized weight exactly: float16/bfloat16 where all matrices are
        stored so, float32 otherwise (dequantized blocks are scale x int + min in float32)."""
        kinds = set(self.matrix_types)
        if kinds == {"F16"}:
            return torch.float16
        if kinds == {"BF16"}:
            return torch.bfloat16
        return torch.float32

    def as_dict(self) -> dict[str, Any]:
        return {"format": "gguf", "file": self.path.name, "architecture": self.architecture,
                "file_type": self.file_type, "tensor_types": self.tensor_types,
                "matrix_types": self.matrix_types, "description": self.describe(), "short": self.short()}


ROUNDING_NOTE = ("its weights already carry llama.cpp's rounding: every quality result is relative to the "
                 "quantized file, not the original model")


def source_record(model_dir: str | Path | None) -> dict[str, Any] | None:
    """What a conversion in `model_dir` was made from (its llmslim_source.json `source`), or None."""
    record = converted_from(Path(model_dir)) if model_dir is not None else None
    return record.get("source") if record else None


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def _dequantizable() -> set[str]:
    from gguf import quants

    return {"F32", "F16"} | {t.name for t in quants._type_traits}


def _open(path: Path) -> Any:
    """gguf's reader, with its failures on a bad file as one line."""
    from gguf import GGUFReader

    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except Exception as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        if "magic" in reason.lower():
            raise UserError(f"{path}: not a GGUF file ({reason})") from None
        raise UserError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {reason}); "
                        "download or copy it again") from None


@dataclass(frozen=True)
class _Tensor:
    """Where one tensor lies in the file and how it is stored (the reader itself holds every metadata
    string of the file, e.g. 49k tokens and 48k merges, as numpy arrays: not kept during conversion)."""

    name: str
    tensor_type: Any
    n_elements: int
    data_offset: int
    raw_dtype: Any
    raw_shape: tuple[int, ...]


def inspect_gguf(path: str | Path) -> tuple[GgufInfo, list[_Tensor]]:
    """The file's description and its tensors' places; every problem that can be seen in the header is one
    line here: truncation, an architecture transformers cannot read, a tensor type gguf cannot
    dequantize, no tokenizer."""
    from gguf import LlamaFileType
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path)
    reader = _open(path)
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise UserError(f"{path}: truncated: its tensors need {end:,} bytes but the file has {size:,}; "
                        "download or copy it again")

    def field_value(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = str(field_value("general.architecture") or "")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture '{arch or '?'}' cannot be read by transformers "
                        f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    if field_value("tokenizer.ggml.tokens") is None or field_value("tokenizer.ggml.model") is None:
        raise UserError(f"{path}: the GGUF holds no tokenizer (no tokenizer.ggml.tokens/model in its metadata); "
                        "llmslim needs the model's tokenizer for calibration and evaluation text")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    readable = _dequantizable()
    bad = [t for t in reader.tensors if t.tensor_type.name not in readable]
    if bad:
        import gguf

        raise UserError(f"{path}: tensor {bad[0].name} is stored as {bad[0].tensor_type.name}, which the gguf package "
                        f"{getattr(gguf, '__version__', '')} cannot dequantize ({len(bad)} such tensor(s)); it reads "
                        f"{', '.join(sorted(readable))}: re-quantize the model with llama.cpp to one of these")
    matrices = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    ftype = field_value("general.file_type")
    try:
        ftype_name = LlamaFileType(int(ftype)).name if ftype is not None else "unknown"
    except ValueError:
        ftype_name = f"type {ftype}"
    tensors = [_Tensor(t.name, t.tensor_type, int(t.n_elements), int(t.data_offset), t.data.dtype, tuple(t.data.shape))
               for t in reader.tensors]
    return GgufInfo(path, arch, ftype_name, dict(types), dict(matrices)), tensors


# ---------------------------------------------------------------- safetensors, one tensor at a time


class _ShardFile:
    """A safetensors file written tensor by tensor: the raw data goes to `<final>.data.tmp` as it comes,
    then the header and the data are joined into `<final>.tmp`, renamed to `final` complete. Memory: the
    tensor being appended."""

    def __init__(self, final: Path):
        self.final = final
        self.data_path = final.with_name(final.name + ".data.tmp")
        self.data = open(self.data_path, "wb")
        self.entries: dict[str, dict[str, Any]] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.contiguous().view(torch.uint8).numpy()  # little-endian on every platform torch builds for
        self.data.write(memoryview(raw))
        self.entries[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + raw.size]}
        self.offset += raw.size

    def close(self) -> list[str]:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        tmp = self.final.with_name(self.final.name + ".tmp")
        with open(tmp, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 4 << 20)  # small buffer: the copy must not cost a tensor's memory
        os.replace(tmp, self.final)
        self.data_path.unlink()
        return list(self.entries)


def _shard_plan(tensors: list[_Tensor], itemsize: int, max_shard_bytes: int) -> list[list[_Tensor]]:
    """GGUF tensors grouped into shards of at most max_shard_bytes of output (one tensor at least), in file
    order: a function of the file alone, so a rerun finds the same shards."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        n = t.n_elements * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _shard_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# ---------------------------------------------------------------- conversion


def conversion_key(path: Path, dtype: torch.dtype | None) -> dict[str, Any]:
    """What determines a conversion: the file (by resolved path, size and modification time) and dtype."""
    st = path.stat()
    return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "dtype": str(dtype).removeprefix("torch.") if dtype else "auto", "version": FORMAT_VERSION}


def converted_from(out: Path) -> dict[str, Any] | None:
    """The record of a finished conversion at `out`, or None."""
    try:
        return json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return None


def convert_gguf(path: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                 progress: Progress | None = None, max_shard_bytes: int = 2 * 10**9) -> dict[str, Any]:
    """Convert a GGUF file into a model directory at `out` (config.json, safetensors shards, tokenizer,
    llmslim_source.json); returns the record. Idempotent: an `out` converted from the same file with the
    same dtype is kept; a kill leaves `<out>.partial`, which the next call continues."""
    from transformers import AutoTokenizer, GenerationConfig

    path, out = Path(path), Path(out)
    progress = progress or Progress()
    key = conversion_key(path, dtype)
    done = converted_from(out)
    if done is not None and done.get("key") == key:
        log.info("%s: already converted from %s", out, path)
        return done
    if out.exists():
        raise UserError(f"{out}: exists and is not a conversion of {path} with dtype {key['dtype']}; "
                        "choose another directory or move it away")
    info, tensors = inspect_gguf(path)
    target = dtype or info.natural_dtype()

    partial = out.with_name(out.name + ".partial")
    marker = partial / ".llmslim-convert.json"
    if partial.exists():
        try:
            same = json.loads(marker.read_text()) == key
        except (OSError, ValueError):
            raise UserError(f"{partial}: exists and was not written by llmslim (it is where the conversion of "
                            f"{path} is assembled); move it away") from None
        if not same:
            shutil.rmtree(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        marker.write_text(json.dumps(key))
    else:
        log.info("%s: continuing an interrupted conversion", partial)

    with progress.track(f"reading {path.name}'s metadata", None):
        config, cfg = _config(path, info, target)
    model_meta = _meta_model(config)
    name_map, processor = _name_map(info.architecture, cfg, model_meta)
    expected = _expected_tensors(model_meta, config)

    itemsize = torch.empty((), dtype=target).element_size()
    shards = _shard_plan(tensors, itemsize, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    skipped: list[str] = []
    keep_large_buffers_out_of_the_heap()  # freed tensor buffers go back to the system, not into a growing heap
    start_rss = rss_bytes()
    with PeakMemory() as mem, progress.track(f"converting {path.name} ({info.describe()}) to {str(target).removeprefix('torch.')}",
                        sum(len(s) for s in shards)) as task:
        for i, group in enumerate(shards, start=1):
            final = partial / ("model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
            if final.is_file():  # written complete by an earlier, killed run
                names = _shard_names(final)
                task.advance(len(group))
            else:
                shard = _ShardFile(final)
                for t in group:
                    for name, tensor in _tensors_of(path, t, processor, name_map, cfg):
                        if name not in expected:
                            skipped.append(name)
                            continue
                        if tuple(tensor.shape) != expected[name]:
                            raise UserError(f"{path}: tensor {t.name} becomes {name} of shape {tuple(tensor.shape)}, "
                                            f"but the config in its metadata implies {expected[name]}")
                        shard.add(name, tensor.to(target))
                        del tensor
                    task.advance()
                names = shard.close()
                crash_point("gguf.shard")
            weight_map.update({name: final.name for name in names})
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise UserError(f"{path}: the GGUF has no tensor for {missing[0]} ({len(missing)} missing), which the "
                        f"{config.model_type} config in its metadata needs")
    if skipped:
        log.info("%s: %d tensor(s) the model does not use were left out: %s", path, len(skipped),
                 ", ".join(sorted(set(skipped))[:5]))
    if n > 1:
        total = sum(t.n_elements for t in tensors) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    with progress.track("writing the tokenizer", None):
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(str(partial))
    config.save_pretrained(str(partial))
    GenerationConfig.from_model_config(config).save_pretrained(str(partial))
    record = {"key": key, "source": info.as_dict(), "dtype": str(target).removeprefix("torch."),
              "chat_template": bool(getattr(tokenizer, "chat_template", None)),
              # host memory of the tensor phase (this run's part of it, after a resume): the claim it bounds
              "memory": {"rss_before_tensors": start_rss, "peak_rss_tensors": mem.peak,
                         "largest_tensor_float32": 4 * max(t.n_elements for t in tensors),
                         "output_bytes": sum(t.n_elements for t in tensors) * itemsize}}
    (partial / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    marker.unlink()
    crash_point("gguf.converted")
    os.replace(partial, out)
    log.info("converted %s (%s) to %s in %s", path, info.describe(), record["dtype"], out)
    return record


def gguf_config(path: str | Path, dtype: torch.dtype | None = None) -> tuple[Any, GgufInfo]:
    """The transformers config a conversion of `path` will have (from the metadata alone: no tensor is read)
    and the file's description; every refusal the conversion would make from the header, made here."""
    info, _ = inspect_gguf(path)
    return _config(Path(path), info, dtype or info.natural_dtype())[0], info


def _config(path: Path, info: GgufInfo, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """(config, the raw dict transformers' GGUF tables made of the metadata): architectures and dtype set,
    refused when llmslim does not support the architecture."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from .adapters import Adapter
    from .gguf_arch import llama_cpp_config

    cfg = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])  # (its tokenizer part: later)
    cfg = llama_cpp_config(path, info.architecture, cfg)  # what llama.cpp fixes in code (Gemma 3's layers)
    config = AutoConfig.for_model(**cfg)
    config.architectures = [_causal_lm_class(config.model_type)]
    config.dtype = str(dtype).removeprefix("torch.")
    try:
        Adapter.for_config(config, str(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return config, cfg


def _causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise UserError(f"model_type {model_type!r} has no causal-LM class in transformers")
    return name


def _meta_model(config: Any) -> Any:
    """The model on the meta device: its parameter names and shapes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _name_map(architecture: str, cfg: dict[str, Any], model: Any) -> tuple[dict[str, str], Any]:
    """transformers' map of GGUF tensor names to its own, and its tensor processor for the architecture."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=cfg)
    return get_gguf_hf_weights_map(model, processor), processor


def _expected_tensors(model: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, with its shape (a tied head is the embedding itself)."""
    out = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def _tensors_of(path: Path, t: _Tensor, processor: Any, name_map: dict[str, str], cfg: dict[str, Any]
                ) -> list[tuple[str, torch.Tensor]]:
    """One GGUF tensor dequantized (float32) and processed into the transformers tensor(s) it becomes:
    usually one (q/k rows un-permuted for llama), several for stacked MoE experts."""
    from gguf import dequantize

    # read with a plain file read, not through the reader's memory map: mapped pages would stay in the
    # process's resident memory until the whole file had been read
    raw = np.fromfile(path, dtype=t.raw_dtype, count=int(np.prod(t.raw_shape)), offset=t.data_offset).reshape(t.raw_shape)
    weights = dequantize(raw, t.tensor_type)
    del raw
    parsed: dict[str, Any] = {"tensors": {}, "config": cfg}
    result = processor.process(weights=weights, name=t.name, tensor_key_mapping=name_map, parsed_parameters=parsed)
    out = [(k, _as_tensor(v)) for k, v in parsed["tensors"].items()]  # what a processor split off (MoE experts)
    if result.name in name_map:
        out.append((name_map[result.name], _as_tensor(result.weights)))
    return out


def _as_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    v = np.ascontiguousarray(v)
    if not v.flags.writeable:  # float32 tensors come back as views of the read-only memory map
        v = v.copy()
    return torch.from_numpy(v)
