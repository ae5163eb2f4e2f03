"""`llmslim validate RECIPE --stand-in`: check a recipe for a model that is not on this machine.

Two checks, both offline:
1. the plan on the real model's shape: its config.json alone (a local directory, the Hugging Face cache,
   or the copy bundled in llmslim/assets/configs) gives exact parameters and bytes after every stage;
2. the whole of `prepare` (model files, shapes, every stage's plan, data paths, output paths) on a tiny
   random model of the same architecture, written to a temporary directory: same model_type, same
   query:KV head ratio, FFN/hidden ratio, expert count and top-k; 2 layers, head_dim 32, vocabulary 512.
Recipes give their cuts as ratios so that both plans make the same cuts. Neither check reads data:
planning never tokenizes, so Hub datasets named by the recipe are not needed.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from .adapters import Adapter
from .checkpoint import declared_dtype
from .errors import UserError
from .loading import looks_like_hub_id
from .plan import PlanRow, PlanState, make_plan
from .recipe import Recipe, load_recipe

BUNDLED = Path(__file__).parent / "assets" / "configs"
HEAD_DIM = 32  # a head size vLLM's CPU attention serves
LAYERS = 2
VOCAB = 512
WIDTH_STEP = 128  # FFN widths stay multiples of 128, as the real ones are, so group-128 quantization plans too


def bundled_config(model: str) -> Path:
    """Where llmslim keeps its copy of a Hub model's config.json (`owner/name` -> owner__name.json)."""
    return BUNDLED / (model.replace("/", "__") + ".json")


def find_config(model: str, revision: str | None) -> tuple[Path, str]:
    """(config.json of the recipe's model, where it was found): a local directory, the Hugging Face
    cache, or llmslim's bundled copy, in that order; a UserError naming the options otherwise."""
    local = Path(model).expanduser() / "config.json"
    if local.is_file():
        return local, "local directory"
    if looks_like_hub_id(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
        if isinstance(cached, str):
            return Path(cached), "Hugging Face cache"
        if bundled_config(model).is_file():
            return bundled_config(model), f"bundled with llmslim ({bundled_config(model).name})"
    known = ", ".join(sorted(p.stem.replace("__", "/") for p in BUNDLED.glob("*.json")))
    raise UserError(f"model: {model}: no config.json found (not a local directory, not in the Hugging Face cache, "
                    f"not bundled; bundled: {known}); fetch it with `huggingface-cli download {model} config.json`, "
                    "or validate without --stand-in")


def load_config(path: Path) -> PretrainedConfig:
    """A config.json file as its transformers config class (the way Checkpoint reads a model's)."""
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a readable config.json: {e}") from None


def source_dtype(recipe: Recipe, config: PretrainedConfig) -> torch.dtype:
    """What the run would work in (pipeline.working_dtype), from the config alone: float32 when it declares none."""
    from .pipeline import working_dtype

    return working_dtype(recipe, declared_dtype(config) or torch.float32)


def real_plan(recipe: Recipe, config: PretrainedConfig) -> list[PlanRow]:
    """The plan's rows on the real model's config: exact parameters and bytes, no weights."""
    state = PlanState(config, Adapter.for_config(config, recipe.spec.model), source_dtype(recipe, config))
    return make_plan(recipe, state)[0]


def _scaled(width: int, factor: float) -> int:
    """`width` x `factor`, rounded to the nearest multiple of WIDTH_STEP (at least one step)."""
    return max(WIDTH_STEP, round(width * factor / WIDTH_STEP) * WIDTH_STEP)


def stand_in_config(config: PretrainedConfig) -> PretrainedConfig:
    """A tiny config of the same architecture: the same query:KV head ratio (at most 2 KV heads), head_dim
    32, hidden size in the same ratio to the attention width, FFN (and expert, shared-expert) widths in
    the same ratio to the hidden size, the same experts and top-k, 2 layers, a 512-token vocabulary."""
    shape = Adapter.for_config(config).shape(config)
    group = shape.heads // shape.kv_heads
    kv = min(shape.kv_heads, 2)
    heads = kv * group
    hidden = max(64, round(shape.hidden / (shape.heads * shape.head_dim) * heads * HEAD_DIM / 32) * 32)
    factor = hidden / shape.hidden
    new = copy.deepcopy(config)
    sizes: dict[str, Any] = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                                 head_dim=HEAD_DIM, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                 initializer_range=0.1,  # peaked logits: greedy tokens not decided by noise
                                 bos_token_id=1, eos_token_id=2)  # the ids of a small tokenizer's <s>, </s>
    for field in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(config, field, None):
            sizes[field] = _scaled(getattr(config, field), factor)
    if getattr(config, "pad_token_id", None) is not None:
        sizes["pad_token_id"] = 0
    if getattr(config, "layer_types", None):  # per-layer attention kinds: the first LAYERS of them
        sizes["layer_types"] = list(config.layer_types)[:LAYERS]
    if getattr(config, "max_window_layers", None) is not None:
        sizes["max_window_layers"] = min(config.max_window_layers, LAYERS)
    if getattr(config, "mlp_only_layers", None):
        sizes["mlp_only_layers"] = [i for i in config.mlp_only_layers if i < LAYERS]
    for k, v in sizes.items():
        setattr(new, k, v)
    return new


def save_stand_in(config: PretrainedConfig, path: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """Random weights for `config` (seeded, without touching the global RNG), saved as safetensors."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    return path


def describe(config: PretrainedConfig) -> str:
    """One line: the shape of a config, for the command's output."""
    s = Adapter.for_config(config).shape(config)
    experts = f", {s.experts} experts (top-{s.top_k})" if s.experts else ""
    return (f"{config.model_type}: {s.layers} layers, hidden {s.hidden}, {s.heads} heads / {s.kv_heads} KV heads "
            f"x {s.head_dim}, FFN {s.ffn}{experts}, vocab {s.vocab}")


@dataclass
class StandInResult:
    """What `validate --stand-in` found: the real-shape plan and the stand-in's."""

    config_source: str
    real_config: PretrainedConfig
    real_rows: list[PlanRow]
    stand_in_config: PretrainedConfig
    stand_in_rows: list[PlanRow]
    data_not_read: list[str]  # Hub datasets the recipe names (never loaded by validation)


def validate_stand_in(recipe_path: str, overrides: list[str]) -> StandInResult:
    """Plan the recipe on its model's real config, then run `prepare` on a stand-in of that architecture
    in a temporary directory (removed afterwards)."""
    from .pipeline import prepare
    from .workspace import Workspace

    recipe = load_recipe(recipe_path, overrides)
    path, where = find_config(recipe.spec.model, recipe.spec.revision)
    config = load_config(path)
    rows = real_plan(recipe, config)
    small = stand_in_config(config)
    with tempfile.TemporaryDirectory(prefix="llmslim-stand-in-") as tmp:
        model = save_stand_in(small, Path(tmp) / "model", source_dtype(recipe, config))
        stand_in = load_recipe(recipe_path, [*overrides, f"model={model}", f"output={Path(tmp) / 'out'}"])
        small_rows = prepare(stand_in, Workspace(stand_in.spec.output))[3]
    hub_data = [f"{name} ({src.dataset})" for name, src in recipe.spec.data.items() if src.dataset is not None]
    return StandInResult(f"{path} ({where})", config, rows, small, small_rows, hub_data)

