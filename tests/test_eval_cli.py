"""`llmslim eval` on the command line: SOURCE syntax, one-line errors (bad path, unknown dataset, missing
lm-eval), up-front reasons a backend cannot run, and a quick end-to-end run."""

from __future__ import annotations

import json

import pytest
from tiny_models import add_tokenizer, sample_text, save_tiny

from llmslim.cli import main
from llmslim.errors import UserError
from llmslim.evaluate.sources import parse_source
from llmslim.evaluate.throughput import ThroughputSettings, benchmark, cannot_run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return add_tokenizer(save_tiny("llama", tmp_path_factory.mktemp("cli") / "tiny"))


@pytest.fixture
def offline(monkeypatch):
    """No network: `datasets` fails at once instead of retrying a Hub it cannot reach."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_source_syntax(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello\n")
    s = parse_source(f"{f}@0.25-0.75")
    assert s.data.path == str(f) and s.data.fraction == (0.25, 0.75) and s.label == f"{f}@0.25-0.75"
    d = parse_source("wikitext:wikitext-2-raw-v1:test").data
    assert (d.dataset, d.name, d.split, d.field) == ("wikitext", "wikitext-2-raw-v1", "test", "text")
    d = parse_source("org/data::validation:body@0-0.5").data
    assert (d.dataset, d.name, d.split, d.field, d.fraction) == ("org/data", None, "validation", "body", (0.0, 0.5))
    assert parse_source("c4").data.split == "test"


@pytest.mark.parametrize("spec,message", [
    ("missing.txt", r"--ppl missing.txt: file not found: missing.txt"),
    ("data/missing.jsonl@0-0.5", r"--ppl data/missing.jsonl@0-0.5: file not found"),
    ("a:b:c:d:e", r"too many ':' parts; expected DATASET\[:CONFIG\[:SPLIT\[:FIELD\]\]\]"),
    ("x.txt@0.8-0.2", r"fraction must satisfy 0 <= start < end <= 1"),
    (":cfg", r"no dataset name before ':'"),
])
def test_bad_source_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_source(spec)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["eval", *map(str, argv), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_bad_path_is_one_line_and_exit_2(model, tmp_path, capsys):
    code, out = _run(capsys, model, "--ppl", tmp_path / "nope.txt", "--out", tmp_path / "o")
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --ppl {tmp_path / 'nope.txt'}: file not found: {tmp_path / 'nope.txt'}"], out
    assert "Traceback" not in out and not (tmp_path / "o").exists()  # failed before any work


def test_unknown_dataset_is_one_line_and_exit_2(model, tmp_path, capsys, offline):
    code, out = _run(capsys, model, "--ppl", "no_such_dataset_xyz:cfg:test", "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in out
    [line] = [x for x in out.splitlines() if x.startswith("error:")]
    assert line.startswith("error: --ppl no_such_dataset_xyz:cfg:test: cannot load dataset 'no_such_dataset_xyz'")


def test_jsonl_field_and_path_like_specs(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"body": "x"}\n')
    s = parse_source(f"{f}:body@0-0.5")
    assert (s.data.path, s.data.field, s.data.fraction) == (str(f), "body", (0.0, 0.5))
    with pytest.raises(UserError, match=r"^--ppl \./no/such/dir: file not found"):
        parse_source("./no/such/dir")  # starts like a path: never a dataset lookup


def test_missing_jsonl_field_names_the_flag(model, tmp_path, capsys):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"body": "x"}\n')
    code, out = _run(capsys, model, "--ppl", f, "--out", tmp_path / "o")
    [line] = [x for x in out.splitlines() if x.startswith("error:")]
    assert code == 2 and line == f"error: {f}:1: no field 'text' (--ppl {f}); found: body"


@pytest.mark.parametrize("extra,message", [
    (["--samples", "0"], "error: --samples 0: must be at least 1"),
    (["--seq-len", "1"], "error: --seq-len 1: must be at least 2"),
    (["--stride", "0"], "error: --stride 0: must be a positive number of tokens"),
    (["--samples", "1000"], "tokens, but 1000 window(s) of 64 tokens need 64000; lower --seq-len or --samples"),
])
def test_bad_numbers_are_one_line_errors_before_any_work(model, tmp_path, capsys, extra, message):
    text = tmp_path / "t.txt"
    text.write_text(sample_text(100))
    code, out = _run(capsys, model, "--ppl", text, "--seq-len", 64, *extra, "--out", tmp_path / "o")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], out
    assert "Traceback" not in out and not (tmp_path / "o").exists()


def test_out_that_is_a_file_and_model_without_tokenizer(model, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, out = _run(capsys, model, "--out", tmp_path / "file")
    assert code == 2 and f"error: --out {tmp_path / 'file'}: exists and is not a directory" in out
    bare = save_tiny("llama", tmp_path / "bare")
    text = tmp_path / "t.txt"
    text.write_text(sample_text(100))
    code, out = _run(capsys, model, bare, "--ppl", text, "--out", tmp_path / "o")
    assert code == 2 and f"error: {bare}: the model directory has no tokenizer files" in out
    assert not (tmp_path / "o").exists()  # the first model was not measured in vain


def test_not_a_model_directory(tmp_path, capsys):
    code, out = _run(capsys, tmp_path, "--out", tmp_path / "o")
    assert code == 2 and f"error: {tmp_path}: not a model directory (no config.json)" in out


def test_backend_limits_are_reported_up_front(tmp_path):
    small_heads = save_tiny("llama", tmp_path / "hd16")
    cfg = json.loads((small_heads / "config.json").read_text())
    cfg["head_dim"] = 16
    (small_heads / "config.json").write_text(json.dumps(cfg))
    settings = ThroughputSettings(prompt_len=200, gen_len=100)
    assert "exceeds the model's context (256)" in cannot_run(small_heads, "transformers", settings, gpu=False)
    ok = ThroughputSettings(prompt_len=16, gen_len=8)
    assert "head_dim 16 is not supported by vLLM's CPU attention" in cannot_run(small_heads, "vllm", ok, gpu=False)
    assert cannot_run(small_heads, "vllm", ok, gpu=True) is None
    assert cannot_run(small_heads, "transformers", ok, gpu=False) is None
    result = benchmark(small_heads, "vllm", ok)  # no engine is started for a model that cannot run
    assert result["ok"] is False and "head_dim 16" in result["error"]


def test_cli_end_to_end_prints_the_table(model, tmp_path, capsys):
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": p}) + "\n" for p in sample_text(800).split("\n\n")))
    code, out = _run(capsys, model, "--baseline", model, "--ppl", text, "--seq-len", 48, "--stride", 24,
                     "--backend", "transformers", "--batch-sizes", "1", "--prompt-len", 8, "--gen-len", 4,
                     "--repeats", 1, "--warmup", 0, "--out", tmp_path / "o")
    assert code == 0, out
    assert "| source (windows x seq_len, stride) |" in out and "1.000x" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    ppl = report["models"][1]["perplexity"][str(text)]
    assert ppl["stride"] == 24 and ppl["seq_len"] == 48
    assert report["settings"]["throughput"]["backends"] == ["transformers"]
