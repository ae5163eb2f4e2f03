"""Kill anywhere, lose nothing: the README's demo command as written (`llmslim run recipes/demo.yaml`: three
stages, a vLLM check, evaluations before and after), from a copy of a clone's root, killed with SIGKILL at
every phase boundary (named crash points, llmslim/faults.py), rerun after each kill. Every rerun must
resume from the last completed unit of work, and the final export must be byte-identical to an
uninterrupted run's. eval/bench_faults.py kills the same chain at random moments too (inside stage work,
the vLLM engine, file writes): a whole demo run per kill, too slow for every CI run."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import REFERENCE, REPO
from fault_runs import export_differences, llmslim_run, missing_reuse
from tiny_models import sample_text

from llmslim.workspace import Workspace, completed_units

pytestmark = pytest.mark.vllm

def write_recipe(root: Path, model: Path, **eval_extra) -> Path:
    """The recipe, in `root`, exporting to root/out; runs in different roots differ only in `output`."""
    root.mkdir(parents=True, exist_ok=True)
    text_file = root.parent / "text.txt"
    if not text_file.exists():
        text_file.write_text(sample_text())
    text = str(text_file)
    recipe = {
        "model": str(model), "output": str(root / "out"),
        "data": {"calib": {"path": text, "fraction": [0.0, 0.5], "samples": 8, "seq_len": 64},
                 "heldout": {"path": text, "fraction": [0.5, 1.0], "seq_len": 64, "samples": 4}},
        "stages": [{"method": "drop_layers", "count": 1, "criterion": "block_influence", "data": "calib"},
                   {"method": "prune_ffn", "intermediate_size": 128, "criterion": "activation", "data": "calib"},
                   {"method": "gptq", "bits": 8, "group_size": -1, "activation_bits": 8, "data": "calib"}],
        "export": {"check": "vllm"}, "eval": {"perplexity": ["heldout"], **eval_extra},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def assert_resumed(units: list[str], log: str) -> None:
    missing = missing_reuse(units, log)
    assert not missing, f"the rerun did not reuse {missing}:\n{log[-3000:]}"


def assert_same_export(a: Path, b: Path) -> None:
    assert export_differences(a, b) == []


CHAIN = ["eval.before", "stage.written", "stage.renamed", "stage.recorded", "gptq.layer:2", "stage.written",
         "export.weights", "export.written", "check.done", "eval.after", "finalize.done"]


def clone_root(root: Path) -> Path:
    """What the demo command reads, laid out as in a fresh clone's root (its paths are relative to it)."""
    shutil.copytree(REPO / "recipes", root / "recipes")
    shutil.copytree(REFERENCE, root / "llmslim" / "assets" / "reference")
    return root


DEMO = Path("recipes/demo.yaml")  # the README's first command: llmslim run recipes/demo.yaml


def test_killed_anywhere_the_demo_resumes_and_ends_byte_identical(tmp_path):
    uninterrupted = clone_root(tmp_path / "uninterrupted")
    rc, out = llmslim_run(DEMO, cwd=uninterrupted)
    assert rc == 0, out[-3000:]
    expected = uninterrupted / "runs" / "demo"

    # every phase boundary, in the order a run reaches them: each rerun is killed at the next one
    root = clone_root(tmp_path / "killed")
    work = Workspace(root / "runs" / "demo")
    for point in CHAIN:
        units = completed_units(work)
        rc, out = llmslim_run(DEMO, cwd=root, crash_at=point)
        assert rc == -signal.SIGKILL, f"{point} was not reached: {out[-3000:]}"
        assert_resumed(units, out)
        assert "exported" in completed_units(work) or not work.output.exists()  # nothing finished-looking
    units = completed_units(work)
    assert "exported" in units
    rc, out = llmslim_run(DEMO, cwd=root)
    assert rc == 0 and "is up to date with this recipe" in out, out[-3000:]
    assert_same_export(expected, work.output)


def test_a_kill_while_replacing_an_export_restores_the_old_one(tiny_tok, tmp_path):
    """The swap of an old export for a new one is two renames; a kill between them leaves the old one in
    the work directory, and the next run puts it back before anything else."""
    recipe = write_recipe(tmp_path / "r", tiny_tok("llama"))
    text = recipe.read_text().replace("check: vllm", "check: transformers")
    recipe.write_text(text)
    rc, out = llmslim_run(recipe)
    assert rc == 0, out[-3000:]
    work = Workspace(tmp_path / "r" / "out")
    weights = {p.name: p.read_bytes() for p in work.output.glob("*.safetensors")}
    rc, out = llmslim_run(recipe, "--set", "eval.stride=32", crash_at="finalize.swap")
    assert rc == -signal.SIGKILL and not work.output.exists() and work.trash.is_dir()
    started = time.time()
    rc, out = llmslim_run(recipe, "--set", "eval.stride=32")
    assert rc == 0 and "restored the previous export" in out, out[-3000:]
    assert {p.name: p.read_bytes() for p in work.output.glob("*.safetensors")} == weights
    assert "stages[2] gptq: done in an earlier run" in out and time.time() - started < 120
