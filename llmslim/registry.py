"""The method registry: maps a recipe `method:` name to its config class, its handler and its
capability flags. The runner reads the flags; it never special-cases a method by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .plan import PlanState
    from .stage import StageContext, StageResult


class MethodConfig(BaseModel):
    """Base of every method's parameters: strict (unknown keys are errors), documented by field
    docstrings (the README's recipe reference is generated from them), immutable."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    def data_source(self) -> str | None:
        """The name of the data source this stage reads, if any (checked against the recipe's `data:`)."""
        return getattr(self, "data", None)

    def data_sources(self) -> list[str]:
        """Every data source this stage reads (a training stage may also read an evaluation source)."""
        name = self.data_source()
        return [name] if name is not None else []

    def before(self, following: MethodConfig | None) -> MethodConfig:
        """This config completed from the config of the stage that follows it (None: the last stage), once, at
        parsing: what is hashed, reported and run is the completed config. Most methods take nothing."""
        return self


@dataclass(frozen=True)
class Method:
    """A compression method as the runner sees it."""

    name: str
    config: type[MethodConfig]
    run: Callable[[StageContext, Any], StageResult] | None
    """Applies the method: reads the stage's input checkpoint, writes its output checkpoint."""
    plan: Callable[[PlanState, Any], PlanState] | None
    """Pure shape arithmetic: the model's shape after the stage, from its shape before (no weights)."""
    changes_shape: bool = False
    trains: bool = False
    planned_for: str = ""
    """For reserved names: the release that brings them."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (called once per method module, at import)."""
    if method.name in METHODS and METHODS[method.name].run is not None:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


class _Reserved(MethodConfig):
    model_config = ConfigDict(extra="allow")


def reserve(name: str, planned_for: str) -> None:
    """Reserve a recipe name for a method that a later release implements."""
    METHODS.setdefault(name, Method(name, _Reserved, None, None, planned_for=planned_for))


def implemented_methods() -> list[str]:
    """Names of the methods that can run now."""
    load_methods()
    return sorted(n for n, m in METHODS.items() if m.run is not None)


def load_methods() -> dict[str, Method]:
    """Import every method module (each registers itself) and return the registry."""
    from . import methods  # noqa: F401

    return METHODS
