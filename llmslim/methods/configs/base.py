"""The base of every method's recipe parameters. It sits at the bottom of the import graph: config modules,
the registry and the recipe all build on it, and it imports nothing of llmslim."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
