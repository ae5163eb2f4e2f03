"""Downstream tasks through the real lm-evaluation-harness, offline: a tiny multiple-choice task defined
in a local YAML file over a local JSON file, run by `llmslim eval --tasks PATH` on tiny models. The
accuracy lm-eval reports is checked against a hand computation of the same log-likelihoods, so the test
proves the right model was scored and the right number reached the report."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
import torch
from tiny_models import add_tokenizer, save_tiny

from llmslim.cli import main
from llmslim.errors import UserError
from llmslim.evaluate.harness import EvalRequest, run_eval

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'lm-eval>=0.4.9,<0.5', "
                                          "or the project's dev extra)")

QUESTIONS = [(f"Tom has {i} red apples and Ann has", [f"{i} blue", f"{i + 1} hats", "many cups"], i % 3)
             for i in range(8)]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder, name="toy_choice"):
    """A task YAML + its data in `folder`; returns the YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    path = folder / f"{name}.yaml"
    path.write_text(TASK_YAML.format(name=name, data=data))
    return path


def hand_accuracy(model_dir) -> float:
    """lm-eval's multiple-choice accuracy, computed here: the continuation " <choice>" is scored after the
    question, tokenized as lm-eval does (the whole string, then the question's tokens split off)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right = 0
    for question, choices, answer in QUESTIONS:
        lls = []
        for choice in choices:
            whole = tok(question + " " + choice)["input_ids"]
            n_ctx = len(tok(question)["input_ids"])
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
        right += int(max(range(len(lls)), key=lambda k: (lls[k], -k)) == answer)
    return right / len(QUESTIONS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    base = add_tokenizer(save_tiny("llama", root / "base"))
    same = root / "same"
    shutil.copytree(base, same)
    small = add_tokenizer(save_tiny("llama", root / "small", layers=2, seed=3))
    return base, same, small


@needs_lm_eval
def test_task_yaml_results_go_into_the_report_with_ratios(models, tmp_path):
    base, same, small = models
    task = write_task(tmp_path / "tasks")
    report = run_eval(EvalRequest(models=[str(same), str(small)], baseline=str(base), out=tmp_path / "out",
                                  tasks=[str(task)]))
    b, s, m = report["models"]
    assert set(b["tasks"]) == {"toy_choice"}
    assert set(b["tasks"]["toy_choice"]) == {"acc,none", "acc_stderr,none"}  # metrics only, no alias/sample_len
    for entry, path in ((b, base), (m, small)):
        assert entry["tasks"]["toy_choice"]["acc,none"] == pytest.approx(hand_accuracy(path))
    if b["tasks"]["toy_choice"]["acc,none"] > 0:  # identical weights: exactly the same answers
        assert s["vs_baseline"]["tasks.toy_choice.acc,none"] == 1.0
    assert not any("stderr" in k for k in s["vs_baseline"])
    assert report["settings"]["tasks"]["names"] == [str(task)]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Downstream tasks (lm-evaluation-harness)" in md and "| toy_choice · acc,none |" in md


@needs_lm_eval
def test_task_directory_runs_every_task_in_it_from_the_cli(models, tmp_path, capsys):
    base, _, _ = models
    write_task(tmp_path / "suite", "toy_a")
    write_task(tmp_path / "suite", "toy_b")
    code = main(["eval", str(base), "--tasks", str(tmp_path / "suite"), "--task-limit", "4", "--out",
                 str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    tasks = json.loads((tmp_path / "out" / "report.json").read_text())["models"][0]["tasks"]
    assert set(tasks) == {"toy_a", "toy_b"} and all("acc,none" in v for v in tasks.values())


@needs_lm_eval
@pytest.mark.parametrize("spec,message", [
    ("no_such_task_xyz", r"--tasks no_such_task_xyz: unknown lm-eval task"),
    ("{tmp}/missing.yaml", r"--tasks .*/missing.yaml: no such task file or directory"),
    ("{tmp}/empty", r"--tasks .*/empty: no lm-eval task defined there"),
])
def test_bad_task_is_one_line_user_error(models, tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=message) as e:
        run_eval(EvalRequest(models=[str(models[0])], out=tmp_path / "out", tasks=[spec.format(tmp=tmp_path)]))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()  # failed before any work


def test_tasks_without_lm_eval_say_what_to_install(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes the import system report lm_eval as absent
    code = main(["eval", str(models[0]), "--tasks", "hellaswag", "--out", str(tmp_path / "o"), "--quiet"])
    out = capsys.readouterr().err
    assert code == 2 and "downstream tasks need lm-evaluation-harness" in out and "pip install 'lm-eval" in out
    assert "Traceback" not in out
