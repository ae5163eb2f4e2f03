"""The README stays true: its commands are what CI runs, its recipe reference matches the schema."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from llmslim.loading import looks_like_hub_id


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_test_one():
    demo, test = readme_commands()
    assert demo.startswith("scripts/setup.sh && ") and "llmslim run recipes/" in demo
    assert test.startswith("scripts/setup.sh && ") and "pytest" in test
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == test


# recipes whose model is on this disk (those naming a Hub model are validated on stand-ins by test_recipes.py)
LOCAL_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml")
                       if not looks_like_hub_id(m := yaml.safe_load(p.read_text())["model"]) or (REPO / m).exists())


def test_demo_recipe_exists_and_validates_offline():
    demo = readme_commands()[0].split()[-1]
    assert (REPO / demo).is_file() and demo in [f"recipes/{p.name}" for p in LOCAL_RECIPES]


@pytest.mark.parametrize("path", LOCAL_RECIPES, ids=lambda p: p.name)
def test_every_ready_recipe_validates_and_plans(path, monkeypatch):
    """Each shipped recipe parses, and its plan (shapes after every stage) is accepted, from the repo root."""
    from llmslim.pipeline import Workspace, validate
    from llmslim.recipe import load_recipe

    text = path.read_text()
    if "../shared" in text and not (REPO.parent / "shared").is_dir():
        pytest.skip("needs ../shared (stories260K, TinyStories): absent on this machine")
    monkeypatch.chdir(REPO)
    recipe = load_recipe(path)
    rows = validate(recipe, Workspace(recipe.spec.output))  # (a GGUF planned from its metadata: nothing written)
    assert len(rows) == len(recipe.stages) + 1


def test_recipe_reference_is_current():
    proc = subprocess.run([sys.executable, "scripts/gen_recipe_reference.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
