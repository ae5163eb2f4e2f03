"""The method registry: maps a recipe `method:` name to its config class, its handler and its capability
flags. The runner reads the flags; it never special-cases a method by name.

The import graph runs one way (tests/test_structure.py checks it):
    methods/configs/*  (recipe parameters: pydantic only)
      <- registry      (this table)
      <- recipe        (parsing and validation)
      <- plan, stage, methods/* (implementations)
      <- pipeline, cli
A method's config class is imported here; its implementation is named as "module:function" and imported
only when a stage is planned or run (`Method.planner()`, `Method.runner()`), so validating a recipe never
loads the implementations, and they may import the recipe, the plan and each other freely.

Adding a method: its config in methods/configs/<name>.py, its `run` and `plan` in methods/<name>.py, one
`register(...)` line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict

from .methods.configs.autoround import AutoRoundConfig
from .methods.configs.awq import AwqConfig
from .methods.configs.base import MethodConfig
from .methods.configs.distill import DistillConfig
from .methods.configs.drop_layers import DropLayersConfig
from .methods.configs.eora import EoraConfig
from .methods.configs.experts import PruneExpertsConfig, SetTopkConfig
from .methods.configs.gptq import GptqConfig, RtnConfig
from .methods.configs.moefy import MoefyConfig
from .methods.configs.prune_ffn import PruneFfnConfig
from .methods.configs.prune_heads import PruneHeadsConfig
from .methods.configs.qat import QatConfig
from .methods.configs.sparsity import SparseGptConfig, WandaConfig

if TYPE_CHECKING:
    from .plan import PlanState
    from .stage import StageContext, StageResult


@dataclass(frozen=True)
class Method:
    """A compression method as the runner sees it."""

    name: str
    config: type[MethodConfig]
    run: str | None
    """The handler, "module:function" (see `runner`); None for a reserved name."""
    plan: str | None
    """The plan function, "module:function" (see `planner`)."""
    changes_shape: bool = False
    trains: bool = False
    follows_quantization: bool = False
    """It works on a quantized model: the plan lets it follow the quantizing stage, and the runner keeps that
    stage's input checkpoint (the weights before quantization) for it (`StageContext.unquantized`)."""
    planned_for: str = ""
    """For reserved names: the release that brings them."""

    def runner(self) -> Callable[[StageContext, Any], StageResult]:
        """The handler: applies the method, reading the stage's input checkpoint and writing its output
        checkpoint (imports the implementation)."""
        return _load(self.run, self.name)

    def planner(self) -> Callable[[PlanState, Any], PlanState]:
        """Pure shape arithmetic: the model's shape after the stage, from its shape before (no weights);
        raises PlanError when the stage's parameters do not fit (imports the implementation)."""
        return _load(self.plan, self.name)


def _load(where: str | None, name: str) -> Any:
    if where is None:
        raise LookupError(f"method {name!r} is reserved and has no implementation")
    module, _, function = where.partition(":")
    return getattr(importlib.import_module(module), function)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry."""
    if method.name in METHODS and METHODS[method.name].run is not None:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


class _Reserved(MethodConfig):
    model_config = ConfigDict(extra="allow")


def reserve(name: str, planned_for: str) -> None:
    """Reserve a recipe name for a method that a later release implements, so that recipes using it get a clear
    message instead of "unknown method" (none is reserved today)."""
    METHODS.setdefault(name, Method(name, _Reserved, None, None, planned_for=planned_for))


def implemented_methods() -> list[str]:
    """Names of the methods that can run now."""
    return sorted(n for n, m in METHODS.items() if m.run is not None)


def _impl(module: str, run: str = "run", plan: str = "plan") -> tuple[str, str]:
    """(run, plan) of an implementation module under llmslim.methods."""
    return f"llmslim.methods.{module}:{run}", f"llmslim.methods.{module}:{plan}"


register(Method("drop_layers", DropLayersConfig, *_impl("drop_layers"), changes_shape=True))
register(Method("prune_heads", PruneHeadsConfig, *_impl("prune_heads"), changes_shape=True))
register(Method("prune_ffn", PruneFfnConfig, *_impl("prune_ffn"), changes_shape=True))
register(Method("moefy", MoefyConfig, *_impl("moefy"), changes_shape=True))
register(Method("prune_experts", PruneExpertsConfig, *_impl("experts", "run_prune", "plan_prune"), changes_shape=True))
register(Method("set_topk", SetTopkConfig, *_impl("experts", "run_topk", "plan_topk"), changes_shape=True))
register(Method("distill", DistillConfig, *_impl("distill"), trains=True))
register(Method("qat", QatConfig, *_impl("qat"), trains=True))
register(Method("awq", AwqConfig, *_impl("awq")))
register(Method("autoround", AutoRoundConfig, *_impl("autoround")))
register(Method("gptq", GptqConfig, *_impl("gptq")))
register(Method("rtn", RtnConfig, *_impl("gptq")))
register(Method("sparsegpt", SparseGptConfig, *_impl("sparsity")))
register(Method("wanda", WandaConfig, *_impl("sparsity")))
register(Method("eora", EoraConfig, *_impl("eora"), follows_quantization=True))
