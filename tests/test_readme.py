"""Every command in the README works as written: each `bash` block's commands are extracted; the
programs they name exist, llmslim's own arguments parse, benchmark and script flags exist, and the cheap
commands (validation, dry runs) run for real from a copy of the repo's root; the demo command runs as
written in tests/test_faults.py (killed at every phase boundary, and uninterrupted)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runner import run_cli
from conftest import REPO

# Commands run to completion here (by their llmslim subcommand and flags); the rest are checked statically
# (programs, files, flags), since they take minutes (benchmarks), a GPU or the Hub.
CHEAP_SUBCOMMANDS = {"validate"}
CHEAP_FLAGS = {"--dry-run", "--help"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """The block's command lines: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.extend(part.strip() for part in line.split("&&"))
    return out


def readme_commands() -> list[str]:
    return [c for b in bash_blocks((REPO / "README.md").read_text()) for c in commands(b)]


def llmslim_argv(words: list[str]) -> list[str] | None:
    """The arguments after `llmslim` (as .venv/bin/llmslim, llmslim, python -m llmslim, accelerate launch
    ... -m llmslim), or None for another program."""
    if words[0] in (".venv/bin/llmslim", "llmslim"):
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1] == "llmslim":
        return words[words.index("-m") + 2:]
    return None


def test_the_extraction_sees_every_kind_of_command():
    cmds = readme_commands()
    assert any(c.startswith("scripts/setup.sh") for c in cmds)
    assert sum(llmslim_argv(shlex.split(c)) is not None for c in cmds) >= 5
    assert commands("a \\\n  --b 1  # note\n# only a comment\nc && d\n") == ["a --b 1", "c", "d"]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_is_well_formed(command):
    """Programs exist; llmslim arguments parse; flags given to our scripts are flags they accept; files
    named under recipes/, eval/ and scripts/ exist."""
    from llmslim.cli import build_parser

    words = shlex.split(command)
    env_free = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # VAR=value prefixes
    for w in env_free:
        if re.match(r"(recipes|eval|scripts)/\S+\.(ya?ml|py|sh)$", w) or w.startswith("scripts/"):
            assert (REPO / w).is_file(), f"{command}: {w} does not exist"
    argv = llmslim_argv(env_free)
    if argv is not None:
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{command}: llmslim rejects these arguments (exit {e.code})")
        return
    program = env_free[0]
    if program == ".venv/bin/python" and env_free[1].startswith("eval/"):
        script = REPO / env_free[1]
        helptext = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True,
                                  text=True, timeout=120)
        assert helptext.returncode == 0, helptext.stderr
        for flag in (w.split("=")[0] for w in env_free[2:] if w.startswith("--")):
            assert flag in helptext.stdout, f"{command}: {script.name} has no {flag}"
    elif program == ".venv/bin/python":
        assert env_free[1:3] == ["-m", "pytest"], command
    elif program in ("accelerate", "vllm", "python", "grep", "pip", "huggingface-cli", "hf"):
        assert shutil.which(program) or program in ("vllm", "python", "hf", "huggingface-cli"), command
    else:
        assert program.startswith("scripts/"), f"{command}: a program the README test does not know"


def cheap(command: str) -> bool:
    argv = llmslim_argv(shlex.split(command))
    return argv is not None and (argv[0] in CHEAP_SUBCOMMANDS or bool(CHEAP_FLAGS & set(argv)))


def recipe_writing(root: Path, output: str) -> Path:
    """The recipe in recipes/ whose `output` is `output` (the README's commands name exports by it)."""
    for path in sorted((root / "recipes").glob("*.yaml")):
        if yaml.safe_load(path.read_text()).get("output") == output:
            return path.relative_to(root)
    raise AssertionError(f"no recipe in recipes/ writes {output}")


@pytest.mark.parametrize("command", [c for c in readme_commands() if cheap(c)])
def test_cheap_readme_command_runs(command, tmp_path):
    """Run from a copy of the repo's recipes and assets, as a new user would from the clone's root. An
    export the command reads (runs/NAME) is first made by the recipe that writes it, as the README's order
    has it, without its check and evaluation (their cost is not what this test is about)."""
    for name in ("recipes", "llmslim"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    argv = llmslim_argv(shlex.split(command))
    for export in {w for w in argv if w.startswith("runs/")} - {w for w in argv if (tmp_path / w).exists()}:
        rc, out = run_cli("run", str(recipe_writing(tmp_path, export)), "--quiet", "--set", "export.check=none",
                          "--set", "eval.perplexity=[]", cwd=tmp_path)
        assert rc == 0, out
    rc, out = run_cli(*argv, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": None})
    assert rc == 0, f"{command}\n{out}"
