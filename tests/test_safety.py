"""The output is ours alone, and bad files get one line: what llmslim refuses, what it never deletes, and
how it fails on truncated weights, missing shards, wrong shapes, unwritable outputs and a full disk."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from tiny_models import sample_text

from llmslim.errors import UserError
from llmslim.pipeline import Workspace, prepare, run
from llmslim.recipe import parse_recipe


def recipe_text(root: Path, model: Path, stages: list | None = None, output: Path | None = None, **extra) -> str:
    root.mkdir(parents=True, exist_ok=True)
    text = root / "text.txt"
    if not text.exists():
        text.write_text(sample_text())
    return yaml.safe_dump({
        "model": str(model), "output": str(output or root / "out"),
        "data": {"calib": {"path": str(text), "fraction": [0.0, 0.5], "samples": 8, "seq_len": 64}},
        "stages": stages if stages is not None else [{"method": "drop_layers", "layers": [1]}],
        "export": {"check": "transformers"}, **extra})


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit code, everything printed): the real command line, run in this process (a child
    process would spend most of its time importing torch and transformers)."""
    from llmslim.cli import main

    def call(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = main([*args])
        captured = capsys.readouterr()
        return rc, captured.out + captured.err

    return call


def one_error_line(out: str) -> str:
    """The single `error:` line of a refused command (and no traceback)."""
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


def copy_model(tiny, tmp_path: Path, arch: str = "llama") -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny(arch), dst)
    return dst


# ---------------------------------------------------------------- the output is ours alone


@pytest.mark.parametrize("where", ["model", "inside model", "contains model", "contains data", "data file"])
def test_output_overlapping_inputs_is_refused_at_validation(cli, tiny, tmp_path, where):
    root = tmp_path / "r"
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny("llama"), model)
    output = {"model": model, "inside model": model / "slim", "contains model": tmp_path / "models",
              "contains data": root, "data file": root / "text.txt"}[where]
    text = recipe_text(root, model, output=output)
    before = sorted(p.name for p in model.iterdir())
    (tmp_path / "recipe.yaml").write_text(text)
    for command in ("validate", "run"):
        rc, out = cli(command, str(tmp_path / "recipe.yaml"))
        line = one_error_line(out)
        assert rc == 2 and f"output: {output} overlaps" in line and "choose an output elsewhere" in line, out
    assert sorted(p.name for p in model.iterdir()) == before
    assert not Path(str(output) + ".work").exists()


def test_an_output_holding_user_files_is_refused_then_moved_aside_on_request(cli, tiny, tmp_path):
    out = tmp_path / "r" / "out"
    out.mkdir(parents=True)
    (out / "thesis.txt").write_text("four years of work")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tmp_path / "r", tiny("llama")))
    rc, text = cli("run", str(recipe))
    line = one_error_line(text)
    assert rc == 2 and "exists and is not an llmslim export (it holds thesis.txt)" in line
    assert "--replace-output" in line and (out / "thesis.txt").read_text() == "four years of work"
    rc, text = cli("run", str(recipe), "--fresh")  # --fresh does not delete it either
    assert rc == 2 and (out / "thesis.txt").read_text() == "four years of work"

    rc, text = cli("run", str(recipe), "--replace-output", "--quiet")
    assert rc == 0, text
    aside = [p for p in out.parent.iterdir() if p.name.startswith("out.replaced-")]
    assert len(aside) == 1 and (aside[0] / "thesis.txt").read_text() == "four years of work"
    assert (out / "llmslim_report.json").is_file() and not (out / "thesis.txt").exists()


def test_fresh_removes_only_what_llmslim_wrote(tiny, tmp_path):
    text = recipe_text(tmp_path / "r", tiny("llama"))
    run(parse_recipe(text))
    out = tmp_path / "r" / "out"
    (out / "notes.txt").write_text("mine")  # a file added to an llmslim export
    with pytest.raises(UserError, match=r"earlier llmslim export with files llmslim did not write \(notes.txt\)"):
        run(parse_recipe(text), fresh=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    run(parse_recipe(text), fresh=True)  # an export of ours with nothing added: replaced
    assert (out / "llmslim_report.json").is_file()

    other = tmp_path / "o"
    (other / "out.work").mkdir(parents=True)
    (other / "out.work" / "data.csv").write_text("1,2")
    with pytest.raises(UserError, match=r"out.work exists and was not created by llmslim"):
        run(parse_recipe(recipe_text(other, tiny("llama"))), fresh=True)
    assert (other / "out.work" / "data.csv").read_text() == "1,2"


def test_files_added_inside_an_export_s_folders_are_never_deleted(cli, tiny_tok, tmp_path):
    """A user's files below the top level of an export (depth 1 and 2, inside the eval/ folder llmslim
    wrote): --fresh and a rerun that would replace the export refuse, naming them; --replace-output moves
    the old export aside with the files in it."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tmp_path / "r", tiny_tok("llama"), eval={"perplexity": ["calib"]},
                                  export={"check": "none"}))
    rc, text = cli("run", str(recipe), "--quiet")
    assert rc == 0, text
    out = tmp_path / "r" / "out"
    assert (out / "eval" / "report.json").is_file()
    added = ["eval/my_notes.txt", "eval/sub/x.txt"]
    (out / "eval" / "sub").mkdir()
    for name in added:
        (out / name).write_text(f"notes {name}")
    for extra in (["--fresh"], ["--set", "eval.stride=32"]):  # start over; a changed recipe's new export
        rc, text = cli("run", str(recipe), *extra)
        line = one_error_line(text)
        assert rc == 2 and f"earlier llmslim export with files llmslim did not write ({', '.join(added)})" in line
        assert "--replace-output" in line and all((out / n).read_text() == f"notes {n}" for n in added)
    rc, text = cli("run", str(recipe), "--set", "eval.stride=32", "--replace-output", "--quiet")
    assert rc == 0, text
    aside = [p for p in out.parent.iterdir() if p.name.startswith("out.replaced-")]
    assert len(aside) == 1 and all((aside[0] / n).read_text() == f"notes {n}" for n in added)
    assert not (out / "eval" / "sub").exists() and not (out / added[0]).exists()
    assert (out / "eval" / "report.json").is_file()


def test_a_changed_file_of_an_export_is_never_deleted(cli, tiny_tok, tmp_path):
    """A recorded file changed since llmslim wrote it is the user's now: a changed size (caught before the
    run starts) and a same-size edit (caught by its sha256 before anything is deleted) are refused by
    --fresh and by a replacing rerun, the file named with what differs; the work directory is kept."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tmp_path / "r", tiny_tok("llama"), eval={"perplexity": ["calib"]},
                                  export={"check": "none"}))
    rc, text = cli("run", str(recipe), "--quiet")
    assert rc == 0, text
    out = tmp_path / "r" / "out"
    report = json.loads((out / "llmslim_report.json").read_text())
    recorded = {e["path"]: e for e in report["export"]["files"]}
    assert {"config.json", "model.safetensors", "llmslim_report.md", "eval/report.json"} <= set(recorded)
    assert "llmslim_report.json" not in recorded
    assert recorded["eval/report.json"]["size"] == (out / "eval" / "report.json").stat().st_size
    md = out / "eval" / "report.md"
    md.write_text(md.read_text() + "my comments\n")
    for extra in (["--fresh"], ["--set", "eval.stride=32"]):
        rc, text = cli("run", str(recipe), *extra)
        line = one_error_line(text)
        assert rc == 2 and "files changed since llmslim wrote them (eval/report.md (size " in line, text
        assert "my comments" in md.read_text()
    md.write_text(md.read_text().replace("my comments\n", ""))  # back to the recorded file
    recipe_copy = out / "llmslim_recipe.yaml"
    edited = recipe_copy.read_text().replace("seed: 0", "seed: 7")
    assert len(edited) == len(recipe_copy.read_text())
    recipe_copy.write_text(edited)  # same size, other content
    for extra in (["--fresh"], ["--set", "eval.stride=32"]):
        rc, text = cli("run", str(recipe), *extra, "--quiet")
        line = one_error_line(text)
        assert rc == 2 and "files changed since llmslim wrote them (llmslim_recipe.yaml (same size, sha256" in line
        assert recipe_copy.read_text() == edited and (tmp_path / "r" / "out.work" / "state.json").is_file()


def test_an_earlier_llmslim_s_report_vouches_for_top_level_files_only(tiny_tok, tmp_path):
    """A report that lists top-level names (as llmslim wrote before it recorded sizes and hashes): the files
    inside its folders cannot be told from added ones, so the export is not llmslim's to delete."""
    from llmslim.workspace import output_problem

    run(parse_recipe(recipe_text(tmp_path / "r", tiny_tok("llama"), eval={"perplexity": ["calib"]},
                                 export={"check": "none"})))
    out = tmp_path / "r" / "out"
    report = json.loads((out / "llmslim_report.json").read_text())
    names = sorted({e["path"].split("/")[0] for e in report["export"]["files"]} - {"llmslim_report.md"})
    report["export"]["files"] = [n for n in names if n != "eval"]
    (out / "llmslim_report.json").write_text(json.dumps(report))
    shutil.rmtree(out / "eval")
    assert output_problem(out) is None  # top-level files only: as before
    report["export"]["files"] = names
    (out / "llmslim_report.json").write_text(json.dumps(report))
    (out / "eval").mkdir()
    (out / "eval" / "report.json").write_text("{}")
    problem = output_problem(out) or ""
    assert "files llmslim did not write (eval/report.json)" in problem and "top-level names only" in problem


@pytest.mark.parametrize("where", ["", "eval", "eval/mine"])
def test_eval_does_not_write_into_an_export(cli, tmp_path, where):
    """`llmslim eval --out` inside an export would add or overwrite files of its record: refused before
    anything is loaded or written."""
    export = tmp_path / "out"
    (export / "eval").mkdir(parents=True)
    (export / "llmslim_report.json").write_text(json.dumps({"export": {"files": []}}))
    out = export / where
    rc, text = cli("eval", str(tmp_path / "no-model"), "--out", str(out))
    line = one_error_line(text)
    assert rc == 2 and f"--out {out}: lies inside the llmslim export {export.resolve()}" in line, text
    assert sorted(p.relative_to(export).as_posix() for p in export.rglob("*")) == ["eval", "llmslim_report.json"]


# ---------------------------------------------------------------- bad files, one line


def test_truncated_weights_are_named(cli, tiny, tmp_path):
    model = copy_model(tiny, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "r.yaml").write_text(recipe_text(tmp_path / "r", model))
    rc, out = cli("run", str(tmp_path / "r.yaml"))
    line = one_error_line(out)
    assert rc == 2 and f"{model / 'model.safetensors'}: not a readable safetensors file" in line
    assert "truncated or corrupt" in line and not (tmp_path / "r" / "out").exists()


def test_missing_shard_and_mismatched_index_are_named(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny("llama")).save_pretrained(model, max_shard_size="300KB")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards[-1].unlink()
    with pytest.raises(UserError, match=rf"{shards[-1].name}: missing: model.safetensors.index.json lists it"):
        prepare(parse_recipe(recipe_text(tmp_path / "a", model)), Workspace(tmp_path / "a" / "out"))
    AutoModelForCausalLM.from_pretrained(tiny("llama")).save_pretrained(model, max_shard_size="300KB")
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shards[-1].name if index["weight_map"][name] != shards[-1].name else shards[0].name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"does not hold {name}, which model.safetensors.index.json says it does"):
        prepare(parse_recipe(recipe_text(tmp_path / "b", model)), Workspace(tmp_path / "b" / "out"))


def test_config_that_disagrees_with_the_weights_is_one_line(cli, tiny, tmp_path):
    model = copy_model(tiny, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 192
    (model / "config.json").write_text(json.dumps(config))
    (tmp_path / "r.yaml").write_text(recipe_text(tmp_path / "r", model))
    rc, out = cli("validate", str(tmp_path / "r.yaml"))
    line = one_error_line(out)
    assert rc == 2 and "model: " in line and "mlp.gate_proj.weight has shape [256, 128] but config.json implies [192, 128]" in line


def test_unwritable_output_is_one_line(cli, tiny, tmp_path):
    (tmp_path / "r.yaml").write_text(recipe_text(tmp_path / "r", tiny("llama"), output=Path("/proc/llmslim/out")))
    rc, out = cli("run", str(tmp_path / "r.yaml"))
    line = one_error_line(out)
    assert rc == 2 and "output: /proc/llmslim/out: cannot create the work directory" in line


@contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG, as they would on a full disk (soft limit only, restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_a_full_disk_while_writing_the_export_keeps_the_previous_one(cli, tiny, tmp_path):
    """The disk fills while the new export is written (simulated with a file-size limit, so that writing the
    weights fails with EFBIG): one line, exit 2, and the previous export is untouched."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tmp_path / "r", tiny("llama"), stages=[]))
    rc, out = cli("run", str(recipe), "--quiet")
    assert rc == 0, out
    export = tmp_path / "r" / "out"
    before = {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()}
    size = (export / "model.safetensors").stat().st_size
    with file_size_limit(size // 4):
        rc, out = cli("run", str(recipe), "--set", "dtype=bfloat16")
    line = one_error_line(out)
    assert rc == 2 and "could not write the export: file too large" in line, out
    assert f"the previous export at {export} is unchanged" in line
    assert {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()} == before
    rc, out = cli("run", str(recipe), "--set", "dtype=bfloat16", "--quiet")  # space again: it completes
    assert rc == 0, out
    assert (export / "model.safetensors").stat().st_size < 0.6 * size


def test_a_failed_measurement_keeps_the_export_and_exits_3(cli, tmp_path):
    """Throughput in vLLM asked for a model vLLM's CPU attention cannot run (head_dim 16): the export is
    written, the report says what failed, the run exits 3 with the reason, and a rerun measures again."""
    from tiny_models import build_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**build_model("llama").config.to_dict(), "num_attention_heads": 8, "head_dim": 16})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m16")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tmp_path / "r", tmp_path / "m16",
                                  eval={"throughput": {"backend": "vllm", "batch_sizes": [1], "repeats": 1}}))
    rc, out = cli("run", str(recipe), "--quiet")
    assert rc == 3, out
    line = one_error_line(out)
    assert "the export is complete at" in line and "2 requested measurement(s) failed" in line
    assert "head_dim 16 is not supported by vLLM's CPU attention" in line
    report = json.loads((tmp_path / "r" / "out" / "llmslim_report.json").read_text())
    assert len(report["failed_measurements"]) == 2
    rc, out = cli("run", str(recipe), "--quiet")
    assert rc == 3 and "up to date" not in out  # not marked done: a rerun tries the measurements again
    assert "reusing its measurements" not in out and "reusing the measurements" not in out


def test_os_errors_are_one_line_with_the_path(cli, tiny, tmp_path):
    text = recipe_text(tmp_path / "r", tiny("llama"))
    (tmp_path / "r.yaml").write_text(text)
    work = tmp_path / "r" / "out.work"
    work.mkdir(parents=True)
    (work / ".llmslim-work").touch()
    (work / "state.json").mkdir()  # state.json cannot be read as a file
    rc, out = cli("run", str(tmp_path / "r.yaml"))
    line = one_error_line(out)
    assert rc == 2 and "state.json" in line and "rerun the same command to continue" in line
    assert os.path.isdir(work / "state.json")


def test_hub_download_errors_keep_their_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = parse_recipe(yaml.safe_dump({"model": "no-such-org/no-such-model", "output": str(tmp_path / "out")}))
    with pytest.raises(UserError) as e:
        prepare(recipe, Workspace(recipe.spec.output))
    line = str(e.value)
    assert line.startswith("model: 'no-such-org/no-such-model' is not a local directory and could not be fetched "
                           "from the Hugging Face Hub: ") and "\n" not in line
    reason = line.split("Hub: ", 1)[1]
    assert len(reason.split(";")[0].split(":", 1)[1].strip()) > 20  # the library's own words, not only a type name
