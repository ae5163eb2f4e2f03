"""Model size from the files alone (nothing is loaded): parameters, bytes on disk, bytes per parameter.

- `params`: the model's logical parameter count, from a copy of it built on the meta device from
  config.json (tied weights once; a quantized export counts the parameters it represents, not its packed
  integers). When transformers cannot build the architecture, the safetensors element count instead.
- `disk_bytes`: the size of the *.safetensors files; `dir_bytes`: every file in the directory.
- `weight_bytes`: the bytes the stored tensors take in memory (elements x dtype size, headers excluded,
  quantization scales included): what an engine that keeps the weights as stored needs for them.
- `bytes_per_param` = weight_bytes / params, and `weight_memory_ratio` = weight_bytes / (params x 2),
  the theoretical weight memory relative to the same model in 16-bit.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}} (plus __metadata__)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _tensor_stats(model_dir: Path) -> tuple[int, int]:
    """(elements, bytes) over all tensors of the directory's safetensors files."""
    elements = nbytes = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        for name, info in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            elements += numel
            start, end = info["data_offsets"]
            nbytes += end - start
    return elements, nbytes


def logical_params(model_dir: Path) -> int | None:
    """Parameter count of the architecture config.json describes (meta device), or None."""
    import torch
    from transformers import AutoConfig

    from ..plan import meta_model

    try:
        config = AutoConfig.from_pretrained(model_dir)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the dense architecture the quantized weights stand for
        model = meta_model(config, torch.float32)
    except Exception:  # an architecture transformers cannot build offline: fall back to the files
        return None
    return sum(p.numel() for p in model.parameters())


def quantization_summary(model_dir: Path) -> str | None:
    """A short description of config.json's quantization ("compressed-tensors W8A8 int", ...), or None."""
    cfg = json.loads((model_dir / "config.json").read_text())
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "quantized")
    for group in (q.get("config_groups") or {}).values():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        wbits, abits = w.get("num_bits"), a.get("num_bits") if a else 16
        return f"{method} W{wbits}A{abits} {w.get('type', '')}".strip()
    bits = q.get("bits") or q.get("w_bit")
    return f"{method}{f' {bits}-bit' if bits else ''}"


def model_size(model_dir: str | Path) -> dict[str, Any]:
    """Size measures of a model directory (see the module docstring)."""
    d = Path(model_dir)
    elements, weight_bytes = _tensor_stats(d)
    params = logical_params(d) or elements
    disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    dir_bytes = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    return {
        "params": params, "disk_bytes": disk, "dir_bytes": dir_bytes, "weight_bytes": weight_bytes,
        "bytes_per_param": weight_bytes / params if params else None,
        "weight_memory_ratio": weight_bytes / (2 * params) if params else None,
        "quantization": quantization_summary(d),
    }
