"""The runner end to end on tiny models: stages, checkpoints, resume after a kill, atomic export, report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import Cli, run_cli
from tiny_models import ARCHS, add_tokenizer, sample_text
from transformers import AutoModelForCausalLM

from llmslim.checkpoint import Checkpoint
from llmslim.errors import UserError
from llmslim.pipeline import run
from llmslim.recipe import parse_recipe


def make_recipe(tmp_path: Path, model: Path, stages: list, **extra) -> str:
    text_file = tmp_path / "text.txt"
    if not text_file.exists():
        text_file.write_text(sample_text())
    recipe = {
        "model": str(model), "output": str(tmp_path / "out"),
        "data": {"calib": {"path": str(text_file), "fraction": [0.0, 0.5], "samples": 16, "seq_len": 64},
                 "heldout": {"path": str(text_file), "fraction": [0.5, 1.0], "seq_len": 64}},
        "stages": stages, "export": {"check": "transformers"}, **extra,
    }
    return yaml.safe_dump(recipe)


def drop_in_memory(model, drop: list[int]):
    """The reference: the same model with layers removed by hand in transformers."""
    layers = [layer for i, layer in enumerate(model.model.layers) if i not in drop]
    model.model.layers = torch.nn.ModuleList(layers)
    for j, layer in enumerate(layers):
        layer.self_attn.layer_idx = j
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_drop_layers_exports_the_same_model_as_removing_them_by_hand(tiny, tmp_path, arch):
    src = tiny(arch)
    recipe = parse_recipe(make_recipe(tmp_path, src, [{"method": "drop_layers", "layers": [2]}]))
    report = run(recipe)
    out = Path(report["output"])
    assert (out / "config.json").is_file() and not (tmp_path / "out.work" / "export.tmp").exists()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = drop_in_memory(AutoModelForCausalLM.from_pretrained(src).eval(), [2])
    assert exported.config.num_hidden_layers == 3
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, expected(x).logits, rtol=0, atol=1e-5)
    stage = report["stages"][0]
    assert stage["notes"]["dropped"] == [2] and stage["params_after"] == sum(p.numel() for p in exported.parameters())
    assert report["check"]["passed"] and "same greedy tokens" in report["check"]["detail"]
    assert {"llmslim_report.json", "llmslim_report.md", "llmslim_recipe.yaml"} <= set(os.listdir(out))
    assert report["plan"][-1]["layers"] == 3 and report["plan"][-1]["params"] == stage["params_after"]


def make_identity_layer(path: Path, index: int) -> None:
    """Zero the attention and MLP output projections of one layer: it then passes its input through."""
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.layers[index].self_attn.o_proj.weight.zero_()
        model.model.layers[index].mlp.down_proj.weight.zero_()
    model.save_pretrained(path)


@pytest.mark.parametrize("criterion", ["block_influence", "angular"])
def test_criteria_find_a_layer_that_does_nothing(tiny, tmp_path, criterion):
    src = tmp_path / "model"
    import shutil

    shutil.copytree(tiny("llama"), src)
    add_tokenizer(src)
    make_identity_layer(src, 1)
    recipe = parse_recipe(make_recipe(tmp_path, src, [{"method": "drop_layers", "count": 1, "criterion": criterion,
                                                        "data": "calib"}], eval={"perplexity": ["heldout"]}))
    report = run(recipe)
    notes = report["stages"][0]["notes"]
    assert notes["dropped"] == [1]
    assert notes["block_influence"][1] < 1e-6 < min(v for i, v in enumerate(notes["block_influence"]) if i != 1)
    before = report["eval"]["before"]["perplexity"]["heldout"]["ppl"]
    after = report["eval"]["after"]["perplexity"]["heldout"]["ppl"]
    assert after == pytest.approx(before, rel=1e-5)  # removing a pass-through layer changes nothing


def test_last_criterion_keeps_the_final_layer(tiny, tmp_path):
    recipe = parse_recipe(make_recipe(tmp_path, tiny("qwen3"), [{"method": "drop_layers", "count": 2, "criterion": "last"}]))
    assert run(recipe)["stages"][0]["notes"]["dropped"] == [1, 2]


def test_dtype_conversion_and_no_stage_export(tiny, tmp_path):
    src = tmp_path / "model"
    import shutil

    shutil.copytree(tiny("llama"), src)
    add_tokenizer(src)
    recipe = parse_recipe(make_recipe(tmp_path, src, [], dtype="bfloat16", eval={"perplexity": ["heldout"]}))
    report = run(recipe)
    out = Checkpoint(report["output"])
    assert all(t.dtype == torch.bfloat16 for t in out.read(out.names).values())
    assert report["size"]["after"]["bytes"] < 0.51 * report["size"]["before"]["bytes"]
    assert (Path(report["output"]) / "tokenizer.json").is_file()
    b, a = report["eval"]["before"]["perplexity"]["heldout"], report["eval"]["after"]["perplexity"]["heldout"]
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)  # both measured in bfloat16 on the same weights


def test_rerun_is_up_to_date_and_changed_recipe_is_refused(tiny, tmp_path, caplog):
    stages = [{"method": "drop_layers", "layers": [1]}]
    text = make_recipe(tmp_path, tiny("llama"), stages)
    first = run(parse_recipe(text))
    started = time.perf_counter()
    second = run(parse_recipe(text))
    assert second == first and time.perf_counter() - started < 5
    changed = make_recipe(tmp_path, tiny("llama"), [{"method": "drop_layers", "layers": [2]}])
    with pytest.raises(UserError, match=r"different recipe \(stages\[0\] drop_layers changed: layers: \[1\] -> \[2\]\).*--fresh"):
        run(parse_recipe(changed))
    assert run(parse_recipe(changed), fresh=True)["stages"][0]["notes"]["dropped"] == [2]


def test_failed_check_leaves_no_finished_looking_export(tmp_path):
    from tiny_models import build_model

    model = build_model("llama")
    model.config.head_dim = 16  # vLLM's CPU attention cannot serve head_dim 16: the check must fail
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**model.config.to_dict(), "num_attention_heads": 8, "head_dim": 16})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m16")
    text = make_recipe(tmp_path, tmp_path / "m16", [{"method": "drop_layers", "layers": [0]}],
                       export={"check": "vllm"})
    with pytest.raises(UserError, match=r"head_dim 16 is not supported.*left in .*export.tmp"):
        run(parse_recipe(text))
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.work" / "export.tmp" / "config.json").is_file()


def test_resume_after_kill_gives_the_same_result(tiny, tmp_path):
    src = tmp_path / "model"
    import shutil

    shutil.copytree(tiny("mixtral"), src)
    add_tokenizer(src)
    stages = [{"method": "drop_layers", "layers": [3]},
              {"method": "drop_layers", "count": 1, "criterion": "block_influence", "data": "calib"}]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    recipe_a = tmp_path / "a" / "r.yaml"
    recipe_a.write_text(make_recipe(tmp_path / "a", src, stages))
    recipe_b = tmp_path / "b" / "r.yaml"
    recipe_b.write_text(make_recipe(tmp_path / "b", src, stages))

    # uninterrupted run
    rc, log = run_cli("run", str(recipe_a), "--quiet")
    assert rc == 0, log

    # killed once stage 0 is on disk, then rerun
    proc = Cli(["run", str(recipe_b), "--quiet"])
    state = tmp_path / "b" / "out.work" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("stages"):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.wait()
    assert not (tmp_path / "b" / "out").exists()
    rc, log = run_cli("run", str(recipe_b), "--quiet")
    assert rc == 0, log
    assert "stages[0] drop_layers: done in an earlier run" in log

    a, b = Checkpoint(tmp_path / "a" / "out"), Checkpoint(tmp_path / "b" / "out")
    ta, tb = a.read(a.names), b.read(b.names)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ra = json.loads((tmp_path / "a" / "out" / "llmslim_report.json").read_text())
    rb = json.loads((tmp_path / "b" / "out" / "llmslim_report.json").read_text())
    assert ra["stages"][1]["notes"] == rb["stages"][1]["notes"]


def test_interrupt_mid_run_exits_130_and_resumes(tiny, tmp_path):
    src = tmp_path / "model"
    import shutil

    shutil.copytree(tiny("llama"), src)
    add_tokenizer(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(make_recipe(tmp_path, src, [{"method": "drop_layers", "layers": [0]}],
                                  eval={"perplexity": ["heldout"]}))
    # Ctrl-C once stage 0 has started (LLMSLIM_CRASH_SIGNAL=INT: the run sends itself SIGINT there)
    rc, out = run_cli("run", str(recipe), "--quiet",
                      env={"LLMSLIM_CRASH_AT": "stage.start", "LLMSLIM_CRASH_SIGNAL": "INT"})
    assert rc == 130 and "interrupted: completed work is kept; rerun the same command to continue" in out, out
    assert "Traceback" not in out and not (tmp_path / "out").exists()
    rc, out = run_cli("run", str(recipe), "--quiet")
    assert rc == 0 and "original model: reusing its measurements" in out, out
    assert (tmp_path / "out" / "llmslim_report.json").is_file()


def test_validate_plan_matches_export(tiny, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(make_recipe(tmp_path, tiny("qwen2_moe"), [{"method": "drop_layers", "layers": [0, 3]}]))
    rc, out = run_cli("validate", str(recipe))
    assert rc == 0, out
    report = run(parse_recipe(recipe.read_text()))
    exported = AutoModelForCausalLM.from_pretrained(report["output"])
    params = sum(p.numel() for p in exported.parameters())
    assert f"{params:,}" in out and report["plan"][-1]["params"] == params
    assert report["plan"][-1]["bytes"] == report["size"]["after"]["bytes"] - _header_bytes(Path(report["output"]))


def _header_bytes(path: Path) -> int:
    """Bytes of safetensors headers (length prefix + JSON), which the plan does not count."""
    total = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += 8 + int.from_bytes(fh.read(8), "little")
    return total


def test_bad_plan_is_refused_before_running(tiny, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(make_recipe(tmp_path, tiny("llama"), [{"method": "drop_layers", "layers": [7]}]))
    rc, out = run_cli("run", str(recipe))
    assert rc == 2 and "Traceback" not in out
    assert "stages[0].layers: layer 7 does not exist; the model has 4 layers (0-3)" in out
    assert not (tmp_path / "out.work").exists()


def test_missing_data_file_is_refused_before_running(tiny, tmp_path):
    text = make_recipe(tmp_path, tiny("llama"), [])
    text = text.replace(str(tmp_path / "text.txt"), str(tmp_path / "nope.txt"), 1)
    with pytest.raises(UserError, match=r"data.calib.path: file not found: .*nope.txt"):
        from llmslim.pipeline import Workspace, prepare

        recipe = parse_recipe(text)
        prepare(recipe, Workspace(recipe.spec.output))


def test_report_markdown_cuts_long_stage_notes_that_the_json_keeps_whole():
    from llmslim.report import render_markdown

    kept = list(range(300))
    report = {"model": "m", "output": "out", "export": {"format": "hf"}, "recipe_hash": "h",
              "stages": [{"index": 0, "method": "prune_ffn", "seconds": 1.0, "params_before": 10, "params_after": 8,
                          "bytes_after": 16, "summary": {"ffn": "384 -> 256", "kept": {"0": {"mlp": kept}}}}],
              "size": {"before": {"params": 10, "bytes": 20}, "after": {"params": 8, "bytes": 16}},
              "eval": {}, "versions": {"torch": "x"}}
    row = next(line for line in render_markdown(report).splitlines() if line.startswith("| 0: prune_ffn"))
    assert "ffn: 384 -> 256" in row and "(in llmslim_report.json)" in row
    assert len(row) < 400 and "299" not in row
