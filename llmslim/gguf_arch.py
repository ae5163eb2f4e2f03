"""What llama.cpp assumes of an architecture's GGUF files that transformers' GGUF tables leave out.

A GGUF holds what llama.cpp's loader reads; the rest of the model is fixed in llama.cpp's code per
architecture, so a conversion must fix it the same way or it converts another model. Gemma 3
(llama-model.cpp, LLM_ARCH_GEMMA3; convert_hf_to_gguf.py, Gemma3Model):
- sliding-window and global layers: with `attention.sliding_window` in the file, every 6th layer is global
  and the others slide (without it, every layer is global); the file stores no layer pattern.
- rotary bases: `rope.freq_base` is the global layers'; sliding layers use 10,000. `rope.scaling.type`
  linear with `rope.scaling.factor` (Gemma 3 4B and larger: 8) applies to the global layers only;
  transformers' tables drop it, and positions would then rotate 8 times too fast in every global layer.
- attention scale: 1/sqrt(head_dim), except the 27B model (62 layers), which uses
  1/sqrt(hidden_size / heads); transformers would take Gemma3TextConfig's default query_pre_attn_scalar
  (256), which is the 27B's 168 nowhere.
- norms: stored as 1 + weight (transformers' Gemma2TensorProcessor subtracts the 1 again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError

GEMMA3_GLOBAL_EVERY = 6  # llama.cpp: hparams.set_swa_pattern(6)
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp: rope_freq_base_train_swa
GEMMA3_27B_LAYERS = 62  # llama.cpp: LLM_TYPE_27B, whose attention scale is 1/sqrt(n_embd / n_head)


def llama_cpp_config(path: Path, architecture: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` (transformers' config dict of the GGUF at `path`) with what llama.cpp assumes for its
    architecture filled in; unchanged for architectures whose files say everything."""
    if architecture != "gemma3":
        return cfg
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path))
    out = dict(cfg)
    layers, hidden, heads = out["num_hidden_layers"], out["hidden_size"], out["num_attention_heads"]
    head_dim = out.get("head_dim") or hidden // heads
    if meta.get("gemma3.attention.sliding_window"):
        out["layer_types"] = ["full_attention" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
                              for i in range(layers)]
    else:
        out["layer_types"] = ["full_attention"] * layers
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(out.pop("rope_theta", 1_000_000.0))}
    scaling, factor = meta.get("gemma3.rope.scaling.type"), meta.get("gemma3.rope.scaling.factor")
    if scaling == "linear" and factor and float(factor) != 1.0:
        full.update(rope_type="linear", factor=float(factor))
    elif scaling not in (None, "none", "linear"):
        raise UserError(f"{path}: rope scaling '{scaling}' of a Gemma 3 GGUF is not supported (llama.cpp's Gemma 3 "
                        "files use linear scaling)")
    out["rope_parameters"] = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_BASE}}
    out["query_pre_attn_scalar"] = hidden // heads if layers == GEMMA3_27B_LAYERS else head_dim
    return out
