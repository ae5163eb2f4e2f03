"""The plan: the model's shape before and after each stage, computed from configs alone (a model built
on the meta device gives exact parameter counts without touching weights), so every stage's
parameters are checked against the real model before anything runs."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from .adapters import Adapter, ModelShape
from .errors import RecipeError

if TYPE_CHECKING:
    from .methods.configs.gptq import Grid


class PlanError(ValueError):
    """A stage's parameters do not fit the model it will see: `field` names the offending parameter."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class WeightFormat(Protocol):
    """How a quantization stage stores weights: lets the plan predict bytes on disk."""

    def model_bytes(self, model: torch.nn.Module, dtype: torch.dtype) -> int: ...

    def vllm_limitation(self, gpu: bool) -> str | None:
        """Why vLLM cannot serve this format on this kind of machine (None: it can)."""
        ...


@dataclass(frozen=True)
class PlanState:
    """What a stage sees: the config, its adapter, the working dtype and (after quantization) the format."""

    config: PretrainedConfig
    adapter: Adapter
    dtype: torch.dtype
    quant: WeightFormat | None = None
    source_dir: Path | None = None  # the recipe's model directory (e.g. to compare a teacher's tokenizer)
    awq_grid: Grid | None = None  # the grid an awq stage searched its scales on (the next quantizer must match)
    original: PretrainedConfig | None = None  # the recipe's model before the first stage (the default teacher)
    lora_rank: int | None = None  # an eora or qat (merge: false) stage wrote a LoRA adapter beside the weights: its largest rank
    lora_trained_on: str | None = None  # the base that adapter trained over, when a later stage re-quantizes it (NF4)
    sparsity: str | None = None  # a sparsity stage zeroed weights ("unstructured" or "N:M"): what follows keeps them
    sparse_linears: tuple[str, ...] = ()  # the Linears it pruned (model.layers.i.name): a training stage masks them

    def with_config(self, config: PretrainedConfig) -> PlanState:
        """This state with a new config (and the adapter of its architecture, which a stage may change)."""
        return replace(self, config=config, adapter=Adapter.for_config(config))

    @property
    def shape(self) -> ModelShape:
        return self.adapter.shape(self.config)

    def size(self) -> tuple[int, int]:
        """(parameters, bytes on disk) of a model with this config."""
        quant: Any = self.quant  # quantization formats are frozen dataclasses: hashable cache keys
        return _size(json.dumps(self.config.to_dict(), sort_keys=True, default=str), self.dtype, quant)


def meta_model(config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The model a config describes, on the meta device: shapes without memory."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@lru_cache(maxsize=64)
def _size(config_json: str, dtype: torch.dtype, quant: Any) -> tuple[int, int]:
    d = json.loads(config_json)
    config = PretrainedConfig.from_dict(d) if "model_type" not in d else _config_class(d).from_dict(d)
    model = meta_model(config, dtype)
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once, as on disk
    if quant is not None:
        return params, quant.model_bytes(model, dtype)
    return params, params * torch.empty((), dtype=dtype).element_size()


def _config_class(d: dict) -> type[PretrainedConfig]:
    from transformers import AutoConfig

    return type(AutoConfig.for_model(d["model_type"]))


@dataclass(frozen=True)
class PlanRow:
    label: str
    shape: ModelShape
    params: int
    bytes: int
    note: str = ""


def make_plan(recipe: Any, state: PlanState) -> tuple[list[PlanRow], list[PlanState]]:
    """Rows (the original, then one per stage) and the PlanState after each stage. Raises RecipeError
    naming the stage field when a stage's parameters do not fit the model."""
    from .gguf import source_record
    from .registry import METHODS

    if state.original is None:
        state = replace(state, original=state.config)
    gguf = source_record(state.source_dir)
    label = f"original ({gguf.get('short') or gguf['description']})" if gguf else "original"
    rows = [PlanRow(label, state.shape, *state.size())]
    states = [state]
    problems = []
    quantized_at = sparse_at = adapter_at = None
    for stage in recipe.stages:
        method = METHODS[stage.method]
        if adapter_at is not None and (problem := _after_dense_adapter(recipe, stage, adapter_at, state)):
            problems.append(problem)
            break
        if sparse_at is not None and method.changes_shape:  # training keeps the mask (llmslim.training.masks)
            problems.append(f"{recipe.where(('stages', stage.index))}: stages[{stage.index}]: {stage.method} cannot "
                            f"follow the sparsity stage in stages[{sparse_at}] (it changes the shapes the mask was "
                            "chosen on); put it before")
            break
        if quantized_at is not None and not method.follows_quantization:
            fix = ("training after quantization is what qat is for: put it before the quantizing stage, or train "
                   "with qat in its place" if method.trains else "put quantization last")
            problems.append(f"{recipe.where(('stages', stage.index))}: stages[{stage.index}]: only eora can follow "
                            f"the quantization in stages[{quantized_at}]; {fix}")
            break
        try:
            state = method.planner()(state, stage.config)
        except PlanError as e:
            path = ("stages", stage.index, e.field)
            problems.append(f"{recipe.where(path)}: stages[{stage.index}].{e.field}: {e}")
            break
        if state.sparsity is not None and sparse_at is None:
            sparse_at = stage.index
        if state.quant is not None and quantized_at is None:  # this stage wrote quantized weights (qat with
            quantized_at = stage.index  # base nf4 does not)
        adapter_at = stage.index if state.lora_rank is not None and state.quant is None else None
        states.append(state)
        rows.append(PlanRow(f"{stage.index}: {stage.method}", state.shape, *state.size()))
    limitation = state.quant.vllm_limitation(torch.cuda.is_available()) if state.quant is not None else None
    if not problems and limitation and recipe.spec.export.check == "vllm":
        problems.append(f"{recipe.where(('export', 'check'))}: export.check: vllm: {limitation}")
    draft_for = getattr(getattr(recipe.spec, "export", None), "draft_for", None)
    if not problems and draft_for:
        problems += _draft_problems(recipe, draft_for, state)
    if problems:
        raise RecipeError(problems)
    return rows, states


def _after_dense_adapter(recipe: Any, stage: Any, adapter_at: int, state: PlanState) -> str | None:
    """Why `stage` cannot follow stages[adapter_at], which left a dense base with a LoRA adapter trained over it
    (qat, base nf4, merge: false), or None. Only a quantizer keeps what the adapter was trained on: the Linears'
    inputs and the weights up to rounding; training, pruning, a second adapter or awq's folded scales (which
    divide the inputs the adapter multiplies) would not."""
    from .registry import METHODS

    method = METHODS[stage.method]
    fix = f"put {stage.method} before the qat stage, or use merge: true"
    if method.follows_quantization:
        fix = f"a model has one adapter: drop {stage.method}, or use merge: true"
    elif not (method.trains or method.changes_shape):
        try:
            after = method.planner()(state, stage.config)
        except PlanError:
            return None  # the stage's own planner says why, with its field
        if after.sparsity != state.sparsity:
            fix = "the dense adapter would fill its zeros: prune first, then train with qat base: grid, merge: true"
        elif after.quant is not None:
            return None
    return (f"{recipe.where(('stages', stage.index))}: stages[{stage.index}]: {stage.method} cannot follow "
            f"stages[{adapter_at}] (qat, base nf4, merge: false): its LoRA adapter was trained over those dense "
            "weights and only gptq, rtn or autoround keep what it computes on (awq divides its inputs by folded "
            f"scales; training, pruning or a second adapter change the model under it); {fix}")


def _draft_problems(recipe: Any, target: str, state: PlanState) -> list[str]:
    """`export.draft_for`: the export (the last state's vocabulary, the recipe model's tokenizer) must pair
    with the target in vLLM's speculative decoding (llmslim.draft)."""
    from .draft import vocab_problem
    from .errors import UserError
    from .loading import resolve_model

    where = f"{recipe.where(('export', 'draft_for'))}: export.draft_for"
    try:
        target_dir = resolve_model(target, field="export.draft_for")
    except UserError as e:
        return [f"{recipe.where(('export', 'draft_for'))}: {e}"]
    target_config = json.loads((target_dir / "config.json").read_text())
    problem = vocab_problem(state.config.to_dict(), target_config, state.source_dir, target_dir)
    return [f"{where}: {target}: {problem}"] if problem else []
