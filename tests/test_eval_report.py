"""The eval harness end to end on tiny models (transformers backend): report.json schema, report.md
ratios, plots, per-model records; throughput statistics on hand-made timings; size measures."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from tiny_models import add_tokenizer, sample_text, save_tiny

from llmslim.evaluate.harness import EvalRequest, run_eval
from llmslim.evaluate.size import model_size
from llmslim.evaluate.throughput import ThroughputSettings, percentile, run_metrics, summarize

NUM = (int, float)
SPREAD = {"median": NUM, "min": NUM, "max": NUM}
DIST = {"p50": NUM, "p95": NUM, "mean": NUM, "count": int}
BATCH = {"batch_size": int, "runs": int, "output_tokens": int, "prefill_tok_s": SPREAD, "decode_tok_s": SPREAD,
         "output_tok_s": SPREAD, "requests_s": SPREAD, "e2e_s": SPREAD, "ttft_s": DIST, "itl_s": DIST,
         "peak_rss_bytes": int, "peak_device_bytes": (int, type(None))}
THROUGHPUT = {"ok": bool, "error": type(None), "dtype": str, "cpus": int, "load_avg": (dict, type(None)),
              "load_seconds": NUM, "base_rss_bytes": int, "peak_rss_bytes": int,
              "peak_device_bytes": (int, type(None)), "kv_cache": (dict, type(None)), "batches": [BATCH]}
PPL = {"ppl": NUM, "nll": NUM, "tokens": int, "windows": int, "seq_len": int, "stride": (int, type(None)),
       "source": str, "dtype": str, "activation_quant": (str, type(None))}
SIZE = {"params": int, "disk_bytes": int, "dir_bytes": int, "weight_bytes": int, "bytes_per_param": NUM,
        "weight_memory_ratio": NUM, "quantization": (str, type(None))}
MODEL = {"name": str, "path": str, "role": str, "size": SIZE, "perplexity": {str: PPL},
         "throughput": {str: THROUGHPUT}, "tasks": dict, "vs_baseline": (dict, type(None))}
REPORT = {"schema": str, "created": str, "command": str,
          "environment": {"device": str, "gpu": bool, "versions": dict},
          "settings": {"perplexity": (dict, type(None)), "throughput": (dict, type(None)), "tasks": type(None)},
          "baseline": (str, type(None)), "models": [MODEL]}


def conforms(value, spec, path="report"):
    """Check `value` against a small schema: a type (or tuple), {key: spec}, {str: spec} or [spec]."""
    if isinstance(spec, list):
        assert isinstance(value, list) and value, f"{path}: expected a non-empty list"
        for i, v in enumerate(value):
            conforms(v, spec[0], f"{path}[{i}]")
    elif isinstance(spec, dict) and list(spec) == [str]:
        assert isinstance(value, dict), path
        for k, v in value.items():
            conforms(v, spec[str], f"{path}.{k}")
    elif isinstance(spec, dict):
        assert isinstance(value, dict), f"{path}: expected a mapping, found {value!r}"
        missing = set(spec) - set(value)
        assert not missing, f"{path}: missing {sorted(missing)}"
        for k, s in spec.items():
            conforms(value[k], s, f"{path}.{k}")
    else:
        assert isinstance(value, spec) and not (isinstance(value, bool) and spec is NUM), \
            f"{path}: {value!r} is not {spec}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    base = add_tokenizer(save_tiny("llama", root / "base"))
    small = add_tokenizer(save_tiny("llama", root / "small", layers=2))
    text = root / "text.txt"
    text.write_text(sample_text(1500))
    return base, small, text


SMALL = ThroughputSettings(batch_sizes=(1, 2), prompt_len=16, gen_len=6, repeats=2, warmup=1)


def test_report_schema_markdown_plots_and_records(models, tmp_path):
    base, small, text = models
    out = tmp_path / "out"
    report = run_eval(EvalRequest(models=[str(small)], baseline=str(base), out=out, ppl=[f"{text}@0.5-1.0"],
                                  seq_len=64, backends=["transformers"], throughput=SMALL, command="test"))
    conforms(report, REPORT)
    assert report["schema"] == "llmslim-eval/1" and report["baseline"] == "base"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    b, s = report["models"]
    assert (b["role"], s["role"]) == ("baseline", "model") and b["vs_baseline"] is None
    label = f"{text}@0.5-1.0"
    ratios = s["vs_baseline"]
    assert ratios["size.params"] == pytest.approx(s["size"]["params"] / b["size"]["params"])
    assert ratios[f"perplexity.{label}"] == pytest.approx(s["perplexity"][label]["ppl"] / b["perplexity"][label]["ppl"])
    for bs in (1, 2):
        assert {f"throughput.transformers.b{bs}.{k}" for k in ("decode_tok_s", "prefill_tok_s", "ttft_p50")} <= set(ratios)
    tb = b["throughput"]["transformers"]["batches"]
    assert [x["batch_size"] for x in tb] == [1, 2] and all(x["runs"] == 2 for x in tb)
    assert tb[1]["output_tokens"] == 2 * 2 * 6 and tb[1]["itl_s"]["count"] == 2 * 2 * 5
    assert b["perplexity"][label]["seq_len"] == 64 and b["perplexity"][label]["stride"] is None

    md = (out / "report.md").read_text()
    assert "| size | base (baseline) | small | small / base |" in md
    assert f"| parameters | {_count(b)} | {_count(s)} | {ratios['size.params']:.3f}x |" in md
    assert "## Throughput (transformers)" in md and "B=2 · decode tok/s" in md
    for png in ("ppl_vs_size.png", "throughput_transformers.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, png
    assert len(list((out / "models").glob("*.json"))) == 2


def _count(m):
    from llmslim.report import human_count

    return human_count(m["size"]["params"])


def test_ppl_plot_covers_every_model_evaluated_into_the_directory(models, tmp_path):
    base, small, text = models
    out = tmp_path / "out"
    run_eval(EvalRequest(models=[str(base)], out=out, ppl=[str(text)], seq_len=64, samples=4))
    first = (out / "ppl_vs_size.png").stat().st_size
    other = tmp_path / "other"
    shutil.copytree(small, other)
    run_eval(EvalRequest(models=[str(small), str(other)], out=out, ppl=[str(text)], seq_len=64, samples=4))
    names = sorted(json.loads(p.read_text())["model"]["name"] for p in (out / "models").glob("*.json"))
    assert names == ["base", "other", "small"]
    assert (out / "ppl_vs_size.png").stat().st_size != first  # redrawn with all three


def test_recipe_eval_section_runs_the_harness_on_original_and_export(models, tmp_path):
    base, _, text = models
    recipe = {"model": str(base), "output": str(tmp_path / "out"),
              "data": {"heldout": {"path": str(text), "fraction": [0.5, 1.0], "seq_len": 64}},
              "stages": [{"method": "drop_layers", "layers": [1]}], "export": {"check": "none"},
              "eval": {"perplexity": ["heldout"], "stride": 32,
                       "throughput": {"backend": "transformers", "batch_sizes": [2], "prompt_len": 8, "gen_len": 4,
                                      "repeats": 1, "warmup": 0}}}
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    report = run(parse_recipe(yaml.safe_dump(recipe)))
    before, after = report["eval"]["before"], report["eval"]["after"]
    assert before["perplexity"]["heldout"]["stride"] == 32 and after["perplexity"]["heldout"]["ppl"] > 0
    assert after["throughput"]["transformers"]["ok"] and after["size"]["params"] < before["size"]["params"]
    ev = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    conforms(ev, REPORT)
    assert [m["name"] for m in ev["models"]] == ["original", "export"] and ev["baseline"] == "original"
    assert (tmp_path / "out" / "eval" / "report.md").is_file()


def test_statistics_on_hand_made_timings():
    # Two requests, prompt 10 tokens, 3 generated each; times in seconds after submission.
    raw = {"ok": True, "load_seconds": 1.0, "base_rss_bytes": 10, "load_peak_rss_bytes": 50, "kv_cache": None,
           "load_peak_device_bytes": None,
           "batches": [{"batch_size": 2, "peak_rss_bytes": 70, "peak_device_bytes": None, "runs": [
               {"e2e_s": 1.0, "requests": [{"times": [0.2, 0.5, 1.0], "tokens": [1, 1, 1]},
                                           {"times": [0.4, 0.6, 0.8], "tokens": [1, 1, 1]}]},
               {"e2e_s": 2.0, "requests": [{"times": [0.5, 1.0, 2.0], "tokens": [1, 1, 1]},
                                           {"times": [0.5, 1.5, 2.0], "tokens": [1, 1, 1]}]}]}]}
    s = summarize(raw, ThroughputSettings(batch_sizes=(2,), prompt_len=10, gen_len=3))
    b = s["batches"][0]
    # run 1: prefill 0.4 s -> 20 / 0.4 = 50 tok/s; decode 2 x 2 tokens in 0.6 s; run 2: 20 / 0.5 = 40, 4 / 1.5
    assert b["prefill_tok_s"] == pytest.approx({"median": 45.0, "min": 40.0, "max": 50.0})
    assert b["decode_tok_s"]["min"] == pytest.approx(4 / 1.5) and b["decode_tok_s"]["max"] == pytest.approx(4 / 0.6)
    assert b["requests_s"] == pytest.approx({"median": 1.5, "min": 1.0, "max": 2.0})
    assert b["ttft_s"]["p50"] == pytest.approx(0.45) and b["ttft_s"]["count"] == 4
    # gaps: 0.3 0.5 | 0.2 0.2 | 0.5 1.0 | 1.0 0.5 -> sorted 0.2 0.2 0.3 0.5 0.5 0.5 1.0 1.0
    assert b["itl_s"]["count"] == 8 and b["itl_s"]["p50"] == pytest.approx(0.5)
    assert s["peak_rss_bytes"] == 70 and b["output_tokens"] == 12
    assert summarize({"ok": False, "error": "boom"}, ThroughputSettings()) == {"ok": False, "error": "boom"}


def test_decode_rate_excludes_tokens_generated_while_prompts_were_still_prefilling():
    # Request A is prefilled first and decodes while B's prompt is processed (chunked prefill, or a token
    # budget too small for both prompts): A's tokens at 0.2 and 0.4 fall inside the prefill period.
    run = {"e2e_s": 1.05, "requests": [{"times": [0.1, 0.2, 0.4, 0.6, 0.8], "tokens": [1] * 5},
                                       {"times": [0.4, 0.6, 0.8, 0.9, 1.0], "tokens": [1] * 5}]}
    m = run_metrics(run, prompt_len=10, gen_len=5)
    assert m["prefill_s"] == 0.4 and m["prefill_tok_s"] == pytest.approx(20 / 0.4)
    # decode: tokens delivered after 0.4 (A: 0.6 0.8; B: 0.6 0.8 0.9 1.0) over 1.0 - 0.4 s
    assert m["decode_s"] == pytest.approx(0.6) and m["decode_tok_s"] == pytest.approx(6 / 0.6)
    assert m["requests_s"] == pytest.approx(2 / 1.05) and m["output_tok_s"] == pytest.approx(10 / 1.05)
    assert m["ttft"] == [0.1, 0.4] and len(m["itl"]) == 8


def test_percentile_matches_numpy():
    import numpy as np

    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for q in (0, 5, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_size_measures(models, tmp_path):
    base, small, _ = models
    a, b = model_size(base), model_size(small)
    assert a["params"] == 722_048 and a["bytes_per_param"] == pytest.approx(4.0, rel=1e-6)
    assert a["weight_memory_ratio"] == pytest.approx(2.0, rel=1e-6) and a["quantization"] is None
    assert b["params"] < a["params"] and 0 < a["disk_bytes"] - a["weight_bytes"] < 16384  # the header only
    cfg = json.loads((base / "config.json").read_text())
    q = tmp_path / "q"
    shutil.copytree(base, q)
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8, "type": "int"}}}}
    (q / "config.json").write_text(json.dumps(cfg))
    assert model_size(q)["quantization"] == "compressed-tensors W8A8 int"
    assert model_size(q)["params"] == a["params"]  # the architecture's parameters, not the files'
