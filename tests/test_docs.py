"""The README stays true: its commands are what CI runs, its recipe reference matches the schema."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_test_one():
    demo, test = readme_commands()
    assert demo.startswith("scripts/setup.sh && ") and "llmslim run recipes/" in demo
    assert test.startswith("scripts/setup.sh && ") and "pytest" in test
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == test


def test_demo_recipe_exists_and_validates_offline():
    demo = readme_commands()[0].split()[-1]
    assert (REPO / demo).is_file()


def test_recipe_reference_is_current():
    proc = subprocess.run([sys.executable, "scripts/gen_recipe_reference.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
