"""LoRA adapters in PEFT's file format (`adapter_config.json` + `adapter_model.safetensors`), as eora and qat
(merge: false) write them beside a quantized model and as transformers+peft and vLLM (`--enable-lora`) read
them. The folder's name (`eora/`, `qat/`) is the stage that wrote it and the model name vLLM serves it as.

A module `model.layers.0.mlp.down_proj` gets `base_model.model.model.layers.0.mlp.down_proj.lora_A.weight`
[rank, in] and `...lora_B.weight` [out, rank]; its output becomes W x + (alpha / rank) B (A x): eora's
scaling is 1 (every rank's lora_alpha equals the rank, in `lora_alpha` and in `alpha_pattern` for the
modules whose rank differs), qat's the alpha / r it trained with."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import save_safetensors

ADAPTER_DIR = "eora"  # eora's adapter folder inside a model directory (a stage's checkpoint, an export)
QAT_ADAPTER_DIR = "qat"  # qat's (merge: false)
ADAPTER_DIRS = (ADAPTER_DIR, QAT_ADAPTER_DIR)  # every stage's: a model directory has at most one of them
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_dir(model_dir: str | Path) -> Path | None:
    """The adapter folder of a model directory (one of ADAPTER_DIRS), or None when it has none."""
    for name in ADAPTER_DIRS:
        path = Path(model_dir) / name
        if (path / CONFIG_FILE).is_file():
            return path
    return None


def write_adapter(path: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
                  all_linears: list[str], alpha: float | None = None) -> int:
    """Write `{module name: (B [out, r], A [r, in])}` as a PEFT LoRA adapter in `path`; returns its weight bytes.
    The most common rank is the config's `r`; the others go to rank_pattern/alpha_pattern by exact name.
    `alpha`: every module's lora_alpha (scaling alpha / rank); None: each module's rank (scaling 1).
    target_modules are the modules' last names (q_proj, ...) when every module of those names is listed,
    else the full names."""
    path.mkdir(parents=True, exist_ok=True)
    ranks = {name: int(a.shape[0]) for name, (_, a) in pairs.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    exact = {re.escape(n): k for n, k in sorted(ranks.items()) if k != r}
    alphas = {k: float(v) for k, v in exact.items()} if alpha is None else {}
    top: float = r if alpha is None else (int(alpha) if float(alpha).is_integer() else alpha)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": top,
        "target_modules": sorted(pairs), "rank_pattern": exact, "alpha_pattern": alphas,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_dora": False, "use_rslora": False,
        "modules_to_save": None, "inference_mode": True, "base_model_name_or_path": None, "init_lora_weights": True,
    }
    _suffix_targets(config, all_linears)
    tensors: dict[str, torch.Tensor] = {}
    for name, (b, a) in sorted(pairs.items()):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_safetensors(tensors, path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _suffix_targets(config: dict, all_linears: list[str]) -> None:
    """Shorten `target_modules` to last names (q_proj, ...) when the full list covers every Linear of those
    names in `all_linears` (the form vLLM documents and PEFT matches by suffix)."""
    full = set(config["target_modules"])
    short = {n.rsplit(".", 1)[-1] for n in full}
    if {n for n in all_linears if n.rsplit(".", 1)[-1] in short} == full:
        config["target_modules"] = sorted(short)


def read_adapter(path: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config, {module name: (B, A)}) of an adapter folder."""
    config = json.loads((path / CONFIG_FILE).read_text())
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
        for key in f.keys():
            if key.endswith(".lora_A.weight"):
                name = key[len(PREFIX):-len(".lora_A.weight")]
                pairs[name] = (f.get_tensor(key.replace(".lora_A.", ".lora_B.")), f.get_tensor(key))
    return config, pairs


def scaling(config: dict, name: str, rank: int) -> float:
    """PEFT's alpha / rank of module `name` (rank `rank`) under an adapter_config as write_adapter writes it."""
    patterns = config.get("alpha_pattern") or {}
    key = next((k for k in patterns if re.fullmatch(k, name)), None)
    return float(patterns[key] if key is not None else config["lora_alpha"]) / rank


def max_rank(path: Path) -> int:
    """The largest rank of an adapter (what vLLM's max_lora_rank must be at least)."""
    config = json.loads((path / CONFIG_FILE).read_text())
    return max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


@torch.no_grad()
def merge_into(model: torch.nn.Module, path: Path) -> None:
    """Add every (alpha / r) B·A of the adapter to its Linear's weight in `model` (in place): the model PEFT
    computes."""
    config, pairs = read_adapter(path)
    for name, (b, a) in pairs.items():
        weight = model.get_submodule(name).weight
        weight += (scaling(config, name, a.shape[0]) * (b.double() @ a.double())).to(weight.dtype)
