"""Regenerate the recipe reference in README.md from the schema (field docstrings are the docs).

    .venv/bin/python scripts/gen_recipe_reference.py          # rewrite README.md in place
    .venv/bin/python scripts/gen_recipe_reference.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llmslim.recipe import (
    DataSource,
    EvalConfig,
    ExportConfig,
    GeneratedText,
    PushConfig,
    RecipeModel,
    ThroughputConfig,
)
from llmslim.registry import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _type(ann: Any) -> str:
    text = getattr(ann, "__name__", None) if isinstance(ann, type) else None
    text = re.sub(r"\b(?:[a-z_]+\.)+([A-Za-z_]+)", r"\1", text or str(ann))  # drop module paths
    return text.replace("NoneType", "null").replace("None", "null").replace("Literal", "one of ").replace("|", "or")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required"
    d = field.default
    if isinstance(d, BaseModel):
        return "see below"
    return "`null`" if d is None else f"`{d}`".replace("'", "")


def table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        doc = " ".join((f.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_type(f.annotation).replace('|', 'or')} | {_default(f)} | {doc} |")
    return rows


def reference() -> str:
    out = ["### Top level", "", *table(RecipeModel), "",
           "### `data.<name>`", "", " ".join((DataSource.__doc__ or "").split()), "", *table(DataSource), "",
           "### `data.<name>.generate`", "", " ".join((GeneratedText.__doc__ or "").split()), "", *table(GeneratedText),
           "",
           "### `export`", "", *table(ExportConfig), "", "### `eval`", "", *table(EvalConfig), "",
           "### `eval.throughput`", "", " ".join((ThroughputConfig.__doc__ or "").split()), "", *table(ThroughputConfig), "",
           "### `push`", "", " ".join((PushConfig.__doc__ or "").split()), "", *table(PushConfig), "",
           "### Stages", "", "Each entry of `stages:` is `method:` plus that method's fields."]
    for name, method in sorted(METHODS.items()):
        if method.run is None:
            out += ["", f"#### `{name}` (reserved: {method.planned_for})"]
            continue
        out += ["", f"#### `{name}`", "", " ".join((method.config.__doc__ or "").split()), "", *table(method.config)]
    return "\n".join(out)


def main() -> int:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"{README}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{reference()}\n{END}{tail}"
    if "--check" in sys.argv:
        if new != text:
            print("README.md recipe reference is stale: run scripts/gen_recipe_reference.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
