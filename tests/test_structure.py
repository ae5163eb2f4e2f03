"""The import graph runs one way (DESIGN.md): method configs and their registration below, the recipe above
them, method implementations above that, the pipeline and the CLI on top. Checked statically (no cycle in
the package's import graph, imports inside functions included) and at run time (validating a recipe that
uses every method imports no implementation)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "llmslim"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def imports_of(name: str, functions: bool) -> set[str]:
    """The llmslim modules that importing `name` executes (with `functions`: also those its functions import
    when called). `from .pkg import x` counts `pkg.x` when it is a module; importing `a.b.c` also runs the
    packages `a` and `a.b` (unless they are packages above `name`, which ran before it anyway). Imports under
    `if TYPE_CHECKING:` never run."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.AST] | object) -> None:
        for node in nodes:  # type: ignore[attr-defined]
            if isinstance(node, ast.If) and _type_checking_only(node):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not functions:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                found.update(f"{origin}.{a.name}" if f"{origin}.{a.name}" in MODULES else origin for a in node.names)
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    executed = set()
    for target in found:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            m = ".".join(parts[:i])
            if m in MODULES and m != name and not name.startswith(m + "."):
                executed.add(m)
    return executed


def import_graph(functions: bool) -> dict[str, set[str]]:
    return {m: imports_of(m, functions) for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle_at_module_level():
    assert cycles(import_graph(functions=False)) == []


def test_no_import_cycle_counting_imports_inside_functions():
    """A function-level import only delays a cycle: `recipe -> registry -> methods/* -> stage -> recipe` was one."""
    assert cycles(import_graph(functions=True)) == []


def test_the_recipe_and_the_registry_reach_no_method_implementation():
    """Everything the recipe imports, transitively and inside functions too, is configs and plumbing: no module
    under llmslim/methods/ but the configs, and not the plan, the stage context or the pipeline."""
    graph = import_graph(functions=True)
    reached, todo = set(), ["llmslim.recipe", "llmslim.registry"]
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += graph[m]
    assert sorted(m for m in reached if _implementation(m)) == []


def _implementation(module: str) -> bool:
    return (module.startswith("llmslim.methods.") and not module.startswith("llmslim.methods.configs")
            or module in ("llmslim.plan", "llmslim.stage", "llmslim.pipeline", "llmslim.cli"))


# one stage of every method, each valid on its own (parsing does not plan, so the order does not matter)
EVERY_METHOD = {
    "drop_layers": {"count": 1, "criterion": "last"},
    "prune_heads": {"ratio": 0.5, "criterion": "magnitude"},
    "prune_ffn": {"ratio": 0.5, "criterion": "magnitude"},
    "moefy": {"experts": 2, "top_k": 1, "data": "calib"},
    "prune_experts": {"keep": 1, "criterion": "random"},
    "set_topk": {"top_k": 1},
    "distill": {"data": "calib", "steps": 1},
    "awq": {"data": "calib"},
    "autoround": {"data": "calib"},
    "qat": {"data": "calib", "steps": 1},
    "gptq": {"data": "calib"},
    "rtn": {},
    "eora": {"data": "calib"},
    "sparsegpt": {"data": "calib"},
    "wanda": {"data": "calib", "structure": "2:4"},
}


def test_validating_a_recipe_of_every_method_imports_no_implementation():
    """In a fresh process: parse a recipe with a stage of every method (awq completed from the stage after
    it), then list what got imported. Implementations load when a stage plans or runs, not before; the
    configs are plain data, so validation does not even import torch."""
    stages = [{"method": name, **params} for name, params in EVERY_METHOD.items()]
    recipe = {"model": "m", "output": "out", "data": {"calib": {"path": "calib.txt"}}, "stages": stages}
    code = textwrap.dedent(f"""
        import json, sys
        from llmslim.recipe import parse_recipe
        from llmslim.registry import implemented_methods
        recipe = parse_recipe({json.dumps(recipe)!r})
        print(json.dumps({{"methods": sorted(s.method for s in recipe.stages), "implemented": implemented_methods(),
                          "modules": sorted(m for m in sys.modules if m.startswith(("llmslim", "torch")))}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["methods"] == seen["implemented"], "add the new method to EVERY_METHOD"
    assert [m for m in seen["modules"] if _implementation(m)] == []
    assert "torch" not in seen["modules"], "a config module imports torch: configs are plain data"


def test_every_method_names_a_config_below_and_an_implementation_above():
    """Each registered method's config lives in llmslim/methods/configs; its `run` and `plan` name functions
    of an implementation module ("module:function"), which load on demand."""
    from llmslim.registry import METHODS

    assert sorted(n for n, m in METHODS.items() if m.run is not None) == sorted(EVERY_METHOD)
    for name, method in METHODS.items():
        if method.run is None:
            continue
        assert method.config.__module__.startswith("llmslim.methods.configs."), name
        for where, fn in ((method.run, method.runner()), (method.plan, method.planner())):
            assert _implementation(where.partition(":")[0]) and callable(fn), (name, where)
