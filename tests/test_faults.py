"""Kill anywhere, lose nothing: the README's demo command as written (`llmslim run recipes/demo.yaml`: three
stages, a vLLM check, evaluations before and after), from a copy of a clone's root, killed with SIGKILL at
every phase boundary (named crash points, llmslim/faults.py), rerun after each kill. Every rerun must
resume from the last completed unit of work, and the final export must be byte-identical to an
uninterrupted run's. The training stages (distill, qat) are killed between checkpoints and right after
one, with the same byte-for-byte verdict and report counters that add up. eval/bench_faults.py kills the
demo chain at random moments too (inside stage work, the vLLM engine, file writes): a whole demo run per
kill, too slow for every CI run."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import REFERENCE, REPO
from fault_runs import export_differences, llmslim_run, missing_reuse
from tiny_models import sample_text
from tiny_models import tiny_recipe as training_recipe

from llmslim.workspace import Workspace, completed_units


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


@pytest.mark.vllm
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


# ---------------------------------------------------------------- training stages

TRAINING = {  # 8 steps, a checkpoint every 3; each a stage whose resume needs saved state beyond weights
    # LoRA dropout: the saved RNG states; AdamW: its moments; the pruned model: the stage's input checkpoint,
    # whose 2:4 zeros the adapters keep (the masks rebuilt from it by the rerun)
    "distill": [{"method": "prune_ffn", "intermediate_size": 128, "criterion": "activation", "data": "calib"},
                {"method": "wanda", "data": "calib", "structure": "2:4"},
                {"method": "distill", "data": "train", "steps": 8, "batch_size": 8, "lr": 3e-3, "warmup": 2,
                 "save_every": 3, "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}],
    # the GPTQ start and its grid, rebuilt by the rerun; learned scales: trained parameters beside LoRA's
    "qat": [{"method": "qat", "data": "train", "calib_data": "calib", "steps": 8, "batch_size": 8, "lr": 1e-2,
             "save_every": 3, "bits": 4, "group_size": 32, "lora": {"r": 4, "alpha": 8}, "learn_scales": True}],
    # merge: false: the frozen integers rebuilt, learned scales beside them, the adapter written apart (qat/)
    "qat-unmerged": [{"method": "qat", "data": "train", "calib_data": "calib", "steps": 8, "batch_size": 8,
                      "lr": 1e-2, "save_every": 3, "bits": 4, "group_size": 32, "merge": False,
                      "lora": {"r": 8, "alpha": 16}, "learn_scales": True}],
}


@pytest.mark.parametrize("method", sorted(TRAINING))
def test_a_killed_training_stage_resumes_to_a_byte_identical_export(method, tiny_tok, tmp_path):
    """Killed after step 5 (steps 4 and 5 lost: the last checkpoint is step 3), then, rerun, right after the
    checkpoint of step 6; the last rerun's export equals an uninterrupted run's byte for byte (weights,
    curve), and its counters cover all 8 steps: the tokens seen, and the training seconds at least the sum
    of the seconds of the steps its curve lists, which came from three processes. (No export check: it
    reads the export, it does not write it.)"""
    stages = TRAINING[method]
    ref = tmp_path / "ref" / "r.yaml"
    killed = tmp_path / "killed" / "r.yaml"
    for path in (ref, killed):
        path.parent.mkdir(parents=True)
        path.write_text(training_recipe(path.parent, tiny_tok("llama"), stages, export={"check": "none"}))
    rc, out = llmslim_run(ref)
    assert rc == 0, out[-3000:]
    rc, out = llmslim_run(killed, crash_at="train.step:5")
    assert rc == -signal.SIGKILL, out[-3000:]
    rc, out = llmslim_run(killed, crash_at="train.saved")  # the first checkpoint this run writes: step 6
    assert rc == -signal.SIGKILL and "resuming the training at step 3 of 8" in out, out[-3000:]
    rc, out = llmslim_run(killed)
    assert rc == 0 and "resuming the training at step 6 of 8" in out, out[-3000:]
    assert_same_export(ref.parent / "out", killed.parent / "out")
    if method == "qat-unmerged":  # the adapter is part of the export, compared byte for byte too
        assert (killed.parent / "out" / "qat" / "adapter_model.safetensors").is_file()
    notes = json.loads((killed.parent / "out" / "llmslim_report.json").read_text())["stages"][-1]["notes"]
    assert notes["resumed_from_step"] == 6 and [p["step"] for p in notes["curve"]] == list(range(1, 9))
    assert notes["tokens_seen"] == 8 * 8 * 64
    steps_seconds = sum(notes["tokens_seen"] / 8 / p["tokens_per_s"] for p in notes["curve"])
    assert notes["train_seconds"] >= 0.99 * steps_seconds, (notes["train_seconds"], steps_seconds)


def test_a_kill_while_writing_the_mixed_allocation_costs_only_the_allocation(tiny_tok, tmp_path, monkeypatch):
    """gptq `mixed:` stores its allocation for a resumed run. A kill in the middle of that write (here:
    Ctrl-C after half the text) must leave no half file that the rerun would read as the allocation."""
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    stage = {"method": "gptq", "data": "calib", "bits": 4, "group_size": 32, "mixed": {"target_bits": 5.5}}
    recipe = parse_recipe(training_recipe(tmp_path / "r", tiny_tok("llama"), [stage]))
    write_text = Path.write_text

    def torn(self, data, *args, **kwargs):
        if self.name.startswith("mixed-allocation.json"):
            write_text(self, data[: len(data) // 2])
            raise KeyboardInterrupt
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        run(recipe)
    monkeypatch.undo()
    report = run(recipe)
    allocation = report["stages"][0]["notes"]["mixed"]
    assert 4 < allocation["average_bits"] <= 5.5 and allocation["targets_upgraded"] > 0
