"""Data sources whose windows are a model's own greedy continuations (`data.<name>.generate`).

The model is the tiny random Llama with a BPE tokenizer (head_dim 32: vLLM's CPU attention serves it, in
float32 for a dense model, so vLLM's greedy tokens must equal transformers' exactly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_models import sample_text

from llmslim import generated
from llmslim.check import greedy, load_for_check
from llmslim.data import DataHub, read_text, tokenize, windows
from llmslim.errors import RecipeError
from llmslim.generated import Generations
from llmslim.loading import load_tokenizer
from llmslim.pipeline import Workspace, run, validate
from llmslim.progress import Progress
from llmslim.recipe import DataSource, parse_recipe

PROMPT, NEW, SAMPLES = 16, 32, 6


def _text(tmp: Path) -> Path:
    path = tmp / "text.txt"
    if not path.exists():
        path.write_text(sample_text())
    return path


def _source(text: Path, **generate) -> dict:
    return {"path": str(text), "fraction": [0.0, 0.5], "samples": SAMPLES,
            "generate": {"prompt_tokens": PROMPT, "new_tokens": NEW, **generate}}


def _recipe(root: Path, checkpoint: Path, stages: list | None = None, **generate) -> str:
    return yaml.safe_dump({"model": str(checkpoint), "output": str(root / "out"),
                           "data": {"gen": _source(_text(root.parent), **generate)},
                           "stages": stages or [], "export": {"check": "transformers"}})


def _hub(model: Path, text: Path, cache: Path, **generate) -> DataHub:
    src = parse_recipe(yaml.safe_dump({"model": str(model), "output": "x", "data": {"gen": _source(text, **generate)}}))
    gens = Generations(cache, model, torch.device("cpu"), Progress())
    return DataHub(src.spec.data, load_tokenizer(model), seed=0, generations=gens)


def _expected_prompts(model: Path, text: Path) -> torch.Tensor:
    """The prompts, computed here from their definition: the first PROMPT tokens of SAMPLES windows of
    PROMPT + NEW tokens of the source's text, chosen with the seed as calibration windows are."""
    stream = tokenize(read_text(DataSource(path=str(text), fraction=(0.0, 0.5)), "gen"), load_tokenizer(model))
    return windows(stream, PROMPT + NEW, SAMPLES, seed=0, name="gen")[:, :PROMPT]


@pytest.fixture(scope="module")
def eos_model(tiny_tok, tmp_path_factory) -> Path:
    """The tiny Llama, with its EOS set to a token it generates greedily from the prompts: a backend that stops
    at (or avoids) EOS gives other windows than one that keeps generating."""
    src = tiny_tok("llama")
    dst = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(src, dst)
    prompts = _expected_prompts(dst, _text(dst.parent))
    tokens = torch.tensor(greedy(load_for_check(dst), prompts.tolist(), NEW))
    eos = int(tokens[:, : NEW // 2].flatten().mode().values)  # early in the continuations, in several of them
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((dst / name).read_text())
        cfg["eos_token_id"] = eos
        (dst / name).write_text(json.dumps(cfg))
    return dst


def test_transformers_windows_are_the_prompt_and_the_models_greedy_continuation(eos_model, tmp_path):
    text = _text(eos_model.parent)
    hub = _hub(eos_model, text, tmp_path / "cache", backend="transformers", batch_size=4)
    got = hub.evaluation("gen")
    prompts = _expected_prompts(eos_model, text)
    continuation = torch.tensor(greedy(load_for_check(eos_model), prompts.tolist(), NEW))  # KV-cache argmax loop
    eos = json.loads((eos_model / "config.json").read_text())["eos_token_id"]
    assert (continuation == eos).any(), "the test needs the model to emit its EOS"
    assert got.shape == (SAMPLES, PROMPT + NEW)
    assert torch.equal(got[:, :PROMPT], prompts)
    assert torch.equal(got[:, PROMPT:], continuation)
    assert torch.equal(hub.calibration("gen"), got)  # all the generated windows, whichever way a stage asks


@pytest.mark.vllm
def test_vllm_generates_the_same_windows_as_transformers(eos_model, tmp_path):
    """Dense float32 in vLLM's CPU kernels and in transformers: the check infrastructure holds these to exact
    token equality (check.vllm_cpu_run's table), so the generated windows must be identical."""
    text = _text(eos_model.parent)
    by_hf = _hub(eos_model, text, tmp_path / "a", backend="transformers").evaluation("gen")
    by_vllm = _hub(eos_model, text, tmp_path / "b", backend="vllm").evaluation("gen")
    assert torch.equal(by_vllm, by_hf)
    with safe_open(str(tmp_path / "b" / "gen.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["info"])["backend"] == "vllm"


def test_generated_windows_are_cached_and_a_changed_field_generates_again(tiny_tok, tmp_path, monkeypatch):
    model = tiny_tok("llama")
    text, cache = _text(tmp_path), tmp_path / "cache"
    calls = []
    real = generated.generate_transformers
    monkeypatch.setattr(generated, "generate_transformers", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first = _hub(model, text, cache, backend="transformers").evaluation("gen")
    mtime = (cache / "gen.safetensors").stat().st_mtime_ns
    again = _hub(model, text, cache, backend="transformers").evaluation("gen")
    assert calls == [NEW] and torch.equal(again, first)
    assert (cache / "gen.safetensors").stat().st_mtime_ns == mtime
    src = _source(text, backend="transformers")
    changed = {**src, "generate": {**src["generate"], "new_tokens": NEW - 8}}  # a changed field
    recipe = parse_recipe(yaml.safe_dump({"model": str(model), "output": "x", "data": {"gen": changed}}))
    hub = DataHub(recipe.spec.data, load_tokenizer(model), seed=0,
                  generations=Generations(cache, model, torch.device("cpu"), Progress()))
    assert hub.evaluation("gen").shape == (SAMPLES, PROMPT + NEW - 8) and calls == [NEW, NEW - 8]
    other_seed = DataHub(recipe.spec.data, load_tokenizer(model), seed=1,
                         generations=Generations(cache, model, torch.device("cpu"), Progress()))
    other_seed.evaluation("gen")  # other prompts: generated again
    assert calls == [NEW, NEW - 8, NEW - 8]
    (cache / "gen.safetensors").write_bytes(b"partial")  # a broken file is never taken as done
    _hub(model, text, cache, backend="transformers").evaluation("gen")
    assert len(calls) == 4


def test_a_distill_stage_trains_on_generated_windows_and_a_rerun_reuses_them(tiny_tok, tmp_path, monkeypatch):
    model = tiny_tok("llama")
    root = tmp_path / "r"
    stages = [{"method": "distill", "data": "gen", "steps": 3, "batch_size": 2, "lr": 1e-3, "warmup": 1}]
    text = _recipe(root, model, stages, backend="transformers")
    calls = []
    real = generated.generate_transformers
    monkeypatch.setattr(generated, "generate_transformers", lambda *a, **k: calls.append(1) or real(*a, **k))
    report = run(parse_recipe(text))
    distill = report["stages"][0]
    assert distill["notes"]["training_windows"] == [SAMPLES, PROMPT + NEW]
    cached = Workspace(root / "out").root / "generated" / "gen.safetensors"
    assert cached.is_file() and calls == [1]
    mtime = cached.stat().st_mtime_ns
    # the same recipe with another evaluation: stages are reused, the generated windows too
    data = yaml.safe_load(text)
    data["eval"] = {"perplexity": ["gen"]}
    report = run(parse_recipe(yaml.safe_dump(data)))
    assert calls == [1] and cached.stat().st_mtime_ns == mtime
    assert report["eval"]["after"]["perplexity"]["gen"]["ppl"] > 0
    run(parse_recipe(text), fresh=True)  # starting over keeps them: their key still matches
    assert calls == [1] and cached.stat().st_mtime_ns == mtime


def _problems(text: str) -> list[str]:
    recipe = parse_recipe(text)
    with pytest.raises(RecipeError) as e:
        validate(recipe, Workspace(recipe.spec.output))
    return e.value.problems


def test_bad_generate_fields_are_refused_in_one_line_each(tiny_tok, tmp_path):
    model = tiny_tok("llama")
    root = tmp_path / "r"
    data = yaml.safe_load(_recipe(root, model))
    data["data"]["gen"]["seq_len"] = 40
    with pytest.raises(RecipeError) as e:
        parse_recipe(yaml.safe_dump(data))
    assert len(e.value.problems) == 1
    assert "data.gen: seq_len 40 must equal generate.prompt_tokens + generate.new_tokens = 16 + 32 = 48" in str(e.value)
    problems = _problems(_recipe(root, model, model=str(tmp_path / "nowhere")))
    assert len(problems) == 1 and f"data.gen.generate.model: {tmp_path / 'nowhere'}: no such model directory" in problems[0]
    wider = tiny_tok("llama", vocab_size=640)  # the same tokenizer, 640 embedding rows
    problems = _problems(_recipe(root, model, model=str(wider)))
    assert len(problems) == 1 and (f"data.gen.generate.model: {wider}: the recipe's model's vocab_size is 512 and "
                                   "this model's 640") in problems[0], problems
    problems = _problems(_recipe(root, model, new_tokens=300))
    assert len(problems) == 1 and "prompt_tokens + new_tokens = 316 exceeds the model's context (256 tokens)" in problems[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's GPU attention takes head_dim 48")
def test_vllm_is_refused_where_it_cannot_serve_the_model_and_auto_falls_back(tiny_tok, tmp_path):
    model = tiny_tok("llama", head_dim=48)  # not among vLLM's CPU attention head sizes
    problems = _problems(_recipe(tmp_path / "r", model, backend="vllm"))
    assert len(problems) == 1, problems
    assert "data.gen.generate.backend: vllm: head_dim 48 is not supported by vLLM's CPU attention" in problems[0]
    assert generated.pick_backend("auto", model) == "transformers"
    assert generated.pick_backend("auto", tiny_tok("llama")) == "vllm" or generated.vllm_problem(tiny_tok("llama"))


def test_a_source_with_generate_outside_a_run_says_where_it_is_made(tiny_tok, tmp_path):
    model = tiny_tok("llama")
    recipe = parse_recipe(_recipe(tmp_path / "r", model))
    hub = DataHub(recipe.spec.data, load_tokenizer(model), seed=0)
    with pytest.raises(Exception, match="generated data is made by `llmslim run`"):
        hub.evaluation("gen")
