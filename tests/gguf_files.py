"""GGUF files for tests, written with the gguf package from tiny transformers models, as llama.cpp's
convert_hf_to_gguf.py lays them out: llama.cpp's tensor names, q/k rows permuted for its rotary layout
(Llama; Gemma 3 keeps them and stores its norms as 1 + weight), matrices quantized (or F32), the tokenizer
in the metadata. `break_*` options make the bad files the conversion must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows (what the conversion must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, path: Path, *, qtype: str = "Q8_0", architecture: str | None = None,
               tokenizer: bool = True, unreadable_type: bool = False) -> Path:
    """Write the llama or Gemma 3 model in `model_dir` (with tokenizer files) as a GGUF at `path`. qtype: the
    type of the 2-D weights (F32, Q8_0, Q4_1, ...); 1-D norms are F32 as llama.cpp writes them.
    architecture: what the header claims (default: the model's); tokenizer=False leaves the tokenizer out of
    the metadata; unreadable_type stores one matrix as Q8_1, which the gguf package cannot dequantize."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    gemma = config.model_type == "gemma3_text"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3 if gemma else gguf.MODEL_ARCH.LLAMA,
                                     config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), architecture or ("gemma3" if gemma else "llama"))
    writer.add_name("tiny test gemma3" if gemma else "tiny test llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if gemma:  # Gemma3Model.set_gguf_parameters: the global layers' rotary base and scaling, the window
        rope = config.rope_parameters["full_attention"]
        writer.add_rope_freq_base(rope["rope_theta"])
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    if tokenizer:
        _add_tokenizer(writer, model_dir)
    first_matrix = True
    for name, tensor in state.items():
        base, suffix = name.rsplit(".", 1)
        w = tensor.float().numpy()
        if gemma and name.endswith("norm.weight"):
            w = w + 1  # llama.cpp stores Gemma's (1 + weight) norms' gain
        elif gemma:
            pass  # Gemma's rotary layout is transformers' own: no permutation
        elif ".q_proj" in name:
            w = _permute(w, config.num_attention_heads)
        elif ".k_proj" in name:
            w = _permute(w, config.num_key_value_heads)
        gguf_name = names.get_name(base) + "." + suffix
        if w.ndim == 2 and unreadable_type and first_matrix:
            block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            writer.add_tensor(gguf_name, np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8), raw_dtype=Q.Q8_1)
        elif w.ndim == 2 and qtype != "F32":
            writer.add_tensor(gguf_name, quants.quantize(w, Q[qtype]), raw_dtype=Q[qtype])
        else:
            writer.add_tensor(gguf_name, w)
        first_matrix = first_matrix and w.ndim != 2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, model_dir: Path) -> None:
    """The byte-level BPE of tests/tiny_models.py, as llama.cpp stores a `gpt2` tokenizer."""
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    merges = spec["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_unk_token_id(vocab["<unk>"])
    writer.add_chat_template("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}")


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF as the gguf package dequantizes it (llama.cpp names and layout)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
