"""Draft models for speculative decoding: `export.draft_for`, `llmslim serve --draft`, `llmslim eval --draft`.

The target is a tiny random Llama (head_dim 32, served by vLLM's CPU attention) with a trained BPE tokenizer;
the draft is made from it by a recipe that drops two of its four layers. vLLM starts twice in this file (the
eval's benchmark without and with the draft)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import run_cli
from tiny_models import tiny_recipe

from llmslim.cli import main
from llmslim.draft import speculative_args, vocab_problem


@pytest.fixture(scope="module")
def pair(tiny_tok, tmp_path_factory) -> tuple[Path, Path]:
    """(target, draft): the draft made by `llmslim run` of a drop_layers recipe declaring `draft_for`."""
    target = tiny_tok("llama")
    root = tmp_path_factory.mktemp("draft") / "recipe"
    text = tiny_recipe(root, target, [{"method": "drop_layers", "data": "calib", "count": 2}],
                       export={"check": "transformers", "draft_for": str(target)})
    recipe = root / "recipe.yaml"
    recipe.write_text(text)
    rc, out = run_cli("run", str(recipe), "--quiet", timeout=600)
    assert rc == 0, out
    return target, root / "out"


def _mismatched(base: Path, tmp: Path) -> Path:
    """A copy of `base` whose tokenizer gives two tokens each other's ids (same size, other ids for the text)."""
    other = tmp / "other-tokenizer"
    shutil.copytree(base, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    ids = {i: t for t, i in vocab.items()}
    first, second = ids[49], ids[80]  # tokens of the probe text's first word
    vocab[first], vocab[second] = 80, 49
    (other / "tokenizer.json").write_text(json.dumps(tok))
    return other


def test_a_draft_recipe_writes_a_draft_and_says_how_to_serve_it(pair):
    target, draft = pair
    report = json.loads((draft / "llmslim_report.json").read_text())
    assert report["export"]["draft_for"] == str(target)
    assert json.loads((draft / "config.json").read_text())["num_hidden_layers"] == 2
    md = (draft / "llmslim_report.md").read_text()
    assert f"A draft model for speculative decoding of `{target}`" in md
    assert f"llmslim serve {target} --draft {draft} --spec-tokens 4" in md
    from llmslim.card import build_card

    card = build_card(draft, "me/tiny-draft")
    assert f"llmslim serve {target} --draft me/tiny-draft --spec-tokens 4" in card
    assert speculative_args("me/tiny-draft", 4)[0] in card


def test_validation_refuses_a_draft_with_another_tokenizer_in_one_line(pair, tmp_path):
    target, _ = pair
    other = _mismatched(target, tmp_path)
    for model, draft_for, what in ((other, target, "encode a probe text differently"),
                                   (target, _wider(target, tmp_path), "vocab_size is 512 and the target's 640")):
        recipe = tmp_path / "r" / "recipe.yaml"
        recipe.parent.mkdir(exist_ok=True)
        recipe.write_text(tiny_recipe(recipe.parent, model, [{"method": "drop_layers", "data": "calib", "count": 1}],
                                      export={"draft_for": str(draft_for)}))
        rc, out = run_cli("validate", str(recipe))
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1, out
        assert f"export.draft_for: {draft_for}: " in errors[0] and what in errors[0], out
        assert "Traceback" not in out


def _wider(base: Path, tmp: Path) -> Path:
    """A model directory whose config has 640 tokens (the weights are not read by the check)."""
    wide = tmp / "wide"
    wide.mkdir(exist_ok=True)
    config = json.loads((base / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": 640}))
    return wide


def test_vocab_problem_accepts_the_pair_and_names_what_differs(pair, tmp_path):
    target, draft = pair
    cfg = json.loads((target / "config.json").read_text())
    assert vocab_problem(json.loads((draft / "config.json").read_text()), cfg, draft, target) is None
    problem = vocab_problem(cfg, cfg, _mismatched(target, tmp_path), target)
    assert problem and "first difference at token" in problem
    small = {**cfg, "vocab_size": 300}  # fewer embedding rows than the tokenizer's tokens
    assert "tokenizer has 359 tokens but its embeddings only 300 rows" in vocab_problem(small, small, target, target)


def test_validation_accepts_a_draft_of_the_target(pair, tmp_path):
    target, _ = pair
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tmp_path, target, [{"method": "drop_layers", "data": "calib", "count": 1}],
                                  export={"draft_for": str(target)}))
    rc, out = run_cli("validate", str(recipe))
    assert rc == 0, out


def test_serve_plan_carries_the_speculative_config(pair, monkeypatch, capsys):
    import torch

    from llmslim import cpu
    from llmslim.cpu import FAMILY_FEATURES

    target, draft = pair
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "detect", lambda: FAMILY_FEATURES["avx512"])
    assert main(["serve", str(target), "--draft", str(draft), "--spec-tokens", "3", "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    assert f"--speculative-config={json.dumps(spec, separators=(',', ':'))}" in out.splitlines()[0]
    assert f"{draft} proposes 3 tokens per step" in out
    from llmslim.serve import serve_plan

    config = json.loads((target / "config.json").read_text())
    plain, spec = (serve_plan(config, gpu=False, features=FAMILY_FEATURES["avx512"], draft=d)
                   for d in (None, (str(draft), json.loads((draft / "config.json").read_text()), 3)))
    kv = [next(n for n in p.notes if n.startswith("KV cache")) for p in (plain, spec)]  # "KV cache 1 GiB (...): N tokens"
    tokens = [int(n.split(": ")[1].split()[0]) for n in kv]
    assert abs(tokens[1] * 6 - tokens[0] * 4) < 6  # (floored) the draft's 2 layers share the cache with the target's 4


def test_serve_refuses_a_mismatched_draft_in_one_line(pair, tmp_path):
    target, _ = pair
    other = _mismatched(target, tmp_path)
    rc, out = run_cli("serve", str(target), "--draft", str(other), "--dry-run", "--quiet", timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and errors == [out.strip().splitlines()[-1]], out
    assert f"--draft {other}: not a draft for {target}: the tokenizers encode a probe text differently" in errors[0]
    assert "--speculative-config" not in out


def test_eval_refuses_a_mismatched_draft_or_no_vllm_before_measuring(pair, tmp_path):
    target, draft = pair
    other = _mismatched(target, tmp_path)
    for argv, message in ((["--draft", str(other), "--throughput"],
                           f"--draft {other}: not a draft for {target}: the tokenizers encode"),
                          (["--draft", str(draft)], f"--draft {draft}: speculative decoding is measured in vLLM's")):
        rc, out = run_cli("eval", str(target), *argv, "--out", str(tmp_path / "eval"), "--quiet", timeout=300)
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and message in errors[0], out


@pytest.mark.vllm
def test_eval_measures_the_draft_and_greedy_tokens_do_not_change(pair, tmp_path):
    """One benchmark without and one with the draft (two vLLM starts): acceptance from vLLM's counters, and
    the greedy tokens of every timed run identical with and without speculative decoding."""
    target, draft = pair
    out = tmp_path / "eval"
    rc, log = run_cli("eval", str(target), "--draft", str(draft), "--spec-tokens", "3", "--throughput",
                      "--dtype", "float32", "--batch-sizes", "1,4", "--prompt-len", "16", "--gen-len", "32",
                      "--repeats", "1", "--warmup", "0", "--out", str(out), "--quiet", timeout=900)
    assert rc == 0, log
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["throughput"]["draft"] == str(draft)
    tput = report["models"][0]["throughput"]
    assert tput["vllm"]["ok"] and tput["vllm+draft"]["ok"], tput
    assert tput["vllm+draft"]["speculative"]["num_speculative_tokens"] == 3
    for plain, spec in zip(tput["vllm"]["batches"], tput["vllm+draft"]["batches"]):
        assert plain["tokens_sha256"] == spec["tokens_sha256"], (plain["batch_size"], "greedy tokens changed")
        acc = spec["speculative"]
        assert acc["drafts"] > 0 and acc["drafts"] <= acc["draft_tokens"] <= 3 * acc["drafts"], acc
        assert 0 <= acc["acceptance_rate"] <= 1 and 1 <= acc["mean_accepted_length"] <= 4, acc
        assert "speculative" not in plain
    md = (out / "report.md").read_text()
    assert "## Speculative decoding" in md and "| yes |" in md and "| NO |" not in md
