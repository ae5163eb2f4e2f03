"""Tiny random models of every supported architecture, built from transformers config classes.

head_dim is 32 (64 for Gemma 3, whose head_dim is independent of hidden / heads) so vLLM's CPU attention
can serve them; sizes are small enough that building and saving one takes well under a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

COMMON = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
              initializer_range=0.1,  # peaked logits: greedy tokens are not decided by float noise
              max_position_embeddings=256, rms_norm_eps=1e-6)


def config_for(arch: str, *, gqa: bool = True, tied: bool | None = None, layers: int = 4, **overrides):
    """A tiny config of `arch`; gqa: 2 KV heads for 4 query heads (else multi-head), tied embeddings
    (default: untied, except Gemma 3, which always ties them); `overrides` replace config fields (e.g.
    intermediate_size)."""
    config = _config(arch, gqa, arch == "gemma3" if tied is None else tied, layers)
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def _config(arch: str, gqa: bool, tied: bool, layers: int):
    kw = dict(COMMON, num_hidden_layers=layers, num_key_value_heads=2 if gqa else 4, tie_word_embeddings=tied)
    moe = dict(num_experts_per_tok=2)
    if arch == "llama":
        return LlamaConfig(**kw, intermediate_size=256)
    if arch == "mistral":
        return MistralConfig(**kw, intermediate_size=256, sliding_window=128)
    if arch == "qwen2":
        return Qwen2Config(**kw, intermediate_size=256)
    if arch == "qwen3":
        return Qwen3Config(**kw, intermediate_size=256)
    if arch == "mixtral":
        return MixtralConfig(**kw, **moe, intermediate_size=128, num_local_experts=4)
    if arch == "qwen2_moe":
        # One dense layer among the sparse ones, and a shared expert.
        return Qwen2MoeConfig(**kw, **moe, intermediate_size=256, moe_intermediate_size=64, num_experts=4,
                              shared_expert_intermediate_size=128, mlp_only_layers=[1])
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**kw, **moe, intermediate_size=256, moe_intermediate_size=64, num_experts=4,
                              decoder_sparse_step=2)
    if arch == "gemma3":
        # head_dim 64 with 4 heads of a 128-wide model: 256-wide attention, so nothing may derive head_dim from
        # hidden / heads; alternating sliding (window 16, shorter than the 64-token calibration windows) and
        # full layers, each kind with its own rotary base; 1/sqrt(query_pre_attn_scalar) != 1/sqrt(head_dim).
        return Gemma3TextConfig(**{**kw, "head_dim": 64}, intermediate_size=256, sliding_window=16,
                                layer_types=[GEMMA3_KINDS[i % 2] for i in range(layers)], query_pre_attn_scalar=48,
                                bos_token_id=1, eos_token_id=2)  # add_tokenizer's ids (Gemma's own are 2 and 1)
    raise ValueError(arch)


GEMMA3_KINDS = ("sliding_attention", "full_attention")
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma3"]


def build_model(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(arch, **kw), dtype=torch.float32).eval()
    if arch == "qwen2":  # random init leaves biases at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if arch == "gemma3":  # Gemma initialises its (1 + weight) norms at weight 0: make them matter (folds, merges)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.3)
    return model


def save_tiny(arch: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> Path:
    """Build and save a tiny `arch` model (safetensors) to `path`; returns the path."""
    model = build_model(arch, seed, **kw).to(dtype)
    model.save_pretrained(path)
    return path


def sample_text(n_sentences: int = 3000, seed: int = 0) -> str:
    """Simple generated English, enough to tokenize into calibration and evaluation windows."""
    import random

    rng = random.Random(seed)
    names = ["Tom", "Mia", "Sam", "Lily", "Ben", "Anna"]
    verbs = ["saw", "found", "liked", "took", "gave", "made"]
    things = ["a red ball", "the big tree", "a small cat", "the blue box", "a warm cake", "the old boat"]
    places = ["in the park", "at home", "by the river", "in the garden", "at school"]
    paras, sent = [], []
    for i in range(n_sentences):
        sent.append(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)} {rng.choice(places)}.")
        if i % 6 == 5:
            paras.append(" ".join(sent))
            sent = []
    return "\n\n".join(paras) + "\n"


def add_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    """Train a small byte-level BPE tokenizer on `sample_text` and save it next to the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_text().splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return path


def tiny_recipe(root: Path, model: Path, stages: list, **extra: Any) -> str:
    """A recipe text for `stages` on a tiny model: calibration and training text from the first half of
    sample_text(), a held-out half, the export checked in transformers (overridable through `extra`)."""
    root.mkdir(parents=True, exist_ok=True)
    text = root.parent / "text.txt"
    if not text.exists():
        text.write_text(sample_text())
    return yaml.safe_dump({
        "model": str(model), "output": str(root / "out"),
        "data": {"calib": {"path": str(text), "fraction": [0.0, 0.5], "samples": 8, "seq_len": 64},
                 "train": {"path": str(text), "fraction": [0.0, 0.5], "seq_len": 64},
                 "heldout": {"path": str(text), "fraction": [0.5, 1.0], "seq_len": 64, "samples": 8}},
        "stages": stages, "export": {"check": "transformers"}, **extra})
