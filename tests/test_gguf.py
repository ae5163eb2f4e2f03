"""GGUF input: `llmslim convert` and `model: FILE.gguf`, on GGUF files written here from tiny models (the
conversion must give back the very model they were written from) and on the real SmolLM2-135M wheel
(the conversion must equal transformers' own GGUF loading)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import run_cli
from conftest import SMOLLM2_GGUF as SMOLLM2
from gguf_files import write_gguf
from tiny_models import add_tokenizer, save_tiny, tiny_recipe


def one_error_line(out: str) -> str:
    """The single `error:` line of a refused command (no traceback, nothing else said as an error)."""
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    path = save_tiny("llama", tmp_path_factory.mktemp("gguf-src") / "model")
    add_tokenizer(path)
    return path


def logits(model_dir: Path, **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 17, 99, 250, 3, 411, 7, 64]])).logits


def test_an_f32_gguf_converts_back_to_the_model_it_was_written_from(tiny_llama, tmp_path):
    """q/k rows un-permuted, names mapped, architectures and dtype set: the same logits, bit for bit."""
    gguf = write_gguf(tiny_llama, tmp_path / "tiny.gguf", qtype="F32")
    rc, out = run_cli("convert", str(gguf), str(tmp_path / "out"), "--quiet")
    assert rc == 0, out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert torch.equal(logits(tmp_path / "out"), logits(tiny_llama))
    record = json.loads((tmp_path / "out" / "llmslim_source.json").read_text())
    assert record["source"]["matrix_types"] == {"F32": 30} and record["chat_template"]
    assert not (tmp_path / "out.partial").exists()


def test_a_quantized_gguf_equals_transformers_own_loading(tiny_llama, tmp_path):
    gguf = write_gguf(tiny_llama, tmp_path / "tiny.gguf", qtype="Q4_1")
    rc, out = run_cli("convert", str(gguf), str(tmp_path / "out"), "--quiet")
    assert rc == 0, out
    assert "Q4_1 (30 Q4_1 matrices) converted to float32" in out
    ours = logits(tmp_path / "out")
    assert torch.equal(ours, logits(tmp_path, gguf_file="tiny.gguf"))
    assert not torch.equal(ours, logits(tiny_llama))  # the file's 4-bit rounding is in the weights


def test_conversion_memory_is_one_tensor_not_the_model(tmp_path):
    """6 and 24 layers (22 and 86 MB in float32, no tensor over 1 MB): the conversion's memory must not grow
    with depth, as transformers' own loading (the whole model dequantized in memory) would."""
    grown, mem = {}, {}
    for layers in (6, 24):
        model = save_tiny("llama", tmp_path / f"m{layers}", layers=layers, hidden_size=256, intermediate_size=1024)
        add_tokenizer(model)
        gguf = write_gguf(model, tmp_path / f"m{layers}.gguf", qtype="Q8_0")
        rc, out = run_cli("convert", str(gguf), str(tmp_path / f"out{layers}"), "--quiet")
        assert rc == 0, out
        mem[layers] = json.loads((tmp_path / f"out{layers}" / "llmslim_source.json").read_text())["memory"]
        grown[layers] = mem[layers]["peak_rss_tensors"] - mem[layers]["rss_before_tensors"]
    largest = mem[24]["largest_tensor_float32"]
    assert mem[24]["output_bytes"] > 80e6 and largest <= 2**20
    # holding the model would grow by the 18 extra layers' 64 MB; a few MB of allocator slack is not that
    assert grown[24] - grown[6] < (mem[24]["output_bytes"] - mem[6]["output_bytes"]) / 4, (grown, mem)
    assert grown[24] < mem[24]["output_bytes"] / 4, (grown, mem)


def test_a_killed_conversion_continues_and_ends_byte_identical(tiny_llama, tmp_path):
    gguf = write_gguf(tiny_llama, tmp_path / "tiny.gguf", qtype="Q8_0")
    rc, out = run_cli("convert", str(gguf), str(tmp_path / "whole"), "--max-shard-size", "1MB", "--quiet")
    assert rc == 0, out
    args = ("convert", str(gguf), str(tmp_path / "out"), "--max-shard-size", "1MB", "--quiet")
    rc, out = run_cli(*args, env={"LLMSLIM_CRASH_AT": "gguf.shard:2"})
    assert rc == -9 and not (tmp_path / "out").exists()
    written = sorted(p.name for p in (tmp_path / "out.partial").glob("model-*.safetensors"))
    assert len(written) == 2, written
    rc, out = run_cli(*args)
    assert rc == 0 and "continuing an interrupted conversion" in out, out
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out").iterdir()) and len(files) > 8
    for name in files:
        if name != "llmslim_source.json":  # (its memory figures differ)
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    rc, out = run_cli(*args)  # converted already: nothing to do
    assert rc == 0 and "already converted" in out


@pytest.mark.parametrize("bad", ["truncated", "not-gguf", "architecture", "type", "no-tokenizer", "exists"])
def test_bad_gguf_files_are_refused_in_one_line(bad, tiny_llama, tmp_path):
    good = write_gguf(tiny_llama, tmp_path / "good.gguf", qtype="Q8_0")
    path = tmp_path / "bad.gguf"
    expected = {"truncated": "truncated", "not-gguf": "not a GGUF file", "architecture": "GGUF architecture 'rwkv7'",
                "type": "Q8_1, which the gguf package", "no-tokenizer": "holds no tokenizer",
                "exists": "exists and is not a conversion"}[bad]
    if bad == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size - 5000])
    elif bad == "not-gguf":
        path.write_bytes(b"<html>404 Not Found</html>" * 10)
    elif bad == "architecture":
        write_gguf(tiny_llama, path, architecture="rwkv7")
    elif bad == "type":
        write_gguf(tiny_llama, path, unreadable_type=True)
    elif bad == "no-tokenizer":
        write_gguf(tiny_llama, path, tokenizer=False)
    else:
        shutil.copy(good, path)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
    rc, out = run_cli("convert", str(path), str(tmp_path / "out"), "--quiet")
    assert rc == 2, out
    assert expected in one_error_line(out)
    if bad == "exists":
        assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_a_recipe_takes_a_gguf_converts_it_once_and_says_so(tiny_llama, tmp_path):
    gguf = write_gguf(tiny_llama, tmp_path / "tiny.gguf", qtype="Q8_0")
    text = tiny_recipe(tmp_path / "r", gguf, [{"method": "prune_ffn", "intermediate_size": 128,
                                                "criterion": "activation", "data": "calib"}],
                       eval={"perplexity": ["heldout"]})
    recipe = tmp_path / "r" / "recipe.yaml"
    recipe.write_text(text)
    rc, out = run_cli("run", str(recipe), "--quiet")
    assert rc == 0, out
    assert "original (GGUF Q8_0)" in out  # the plan's first row
    export = tmp_path / "r" / "out"
    report = json.loads((export / "llmslim_report.json").read_text())
    assert report["source"]["file"] == "tiny.gguf" and report["source"]["matrix_types"] == {"Q8_0": 30}
    assert "llama.cpp's rounding" in report["stages"][0]["notes"]["source"]
    assert "Source: GGUF Q8_0" in (export / "llmslim_report.md").read_text()
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # a rerun (another eval setting) and --fresh reuse the conversion instead of converting again
    rc, out = run_cli("run", str(recipe), "--quiet", "--set", "eval.stride=32")
    assert rc == 0 and "reusing the conversion of" in out, out
    rc, out = run_cli("run", str(recipe), "--quiet", "--fresh")
    assert rc == 0 and "reusing the conversion of" in out and "prune_ffn: starting" in out, out
    # the same file named as `model: DIR` + `gguf_file: NAME`
    data = yaml.safe_load(text)
    data.update(model=str(tmp_path), gguf_file="tiny.gguf", output=str(tmp_path / "r2" / "out"))
    recipe.write_text(yaml.safe_dump(data))
    rc, out = run_cli("validate", str(recipe), "--quiet")
    assert rc == 0 and "GGUF Q8_0" in out, out
    data.update(gguf_file="other.gguf")
    recipe.write_text(yaml.safe_dump(data))
    rc, out = run_cli("validate", str(recipe), "--quiet")
    assert rc == 2 and "gguf_file: other.gguf is not in" in one_error_line(out) and "tiny.gguf" in out


# ---------------------------------------------------------------- the real SmolLM2-135M (scripts/setup.sh)


def test_smollm2_converts_to_what_transformers_loads_from_the_gguf(smollm2):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    record = json.loads((smollm2 / "llmslim_source.json").read_text())
    assert record["source"]["matrix_types"] == {"Q4_1": 210, "Q8_0": 1}
    mem = record["memory"]  # the tensor phase grows the process by a few of its largest tensor, not the model
    assert mem["peak_rss_tensors"] - mem["rss_before_tensors"] < 4 * mem["largest_tensor_float32"]
    assert 4 * mem["largest_tensor_float32"] < mem["output_bytes"]


def test_smollm2_tokenizer_and_chat_template_round_trip(smollm2):
    from conftest import WIKI_TEST, need
    from transformers import AutoTokenizer

    need(WIKI_TEST)
    theirs = AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    ours = AutoTokenizer.from_pretrained(smollm2)
    text = WIKI_TEST.read_text()[:20000]
    assert ours(text).input_ids == theirs(text).input_ids
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n") and ours.eos_token == "<|im_end|>"
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
