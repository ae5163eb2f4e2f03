"""Our GPTQ against llm-compressor 0.14 (the anchor): quality, speed and memory, side by side in one run.

    scripts/setup_anchor.sh                            # once: .venv-anchor with llmcompressor==0.14.0.1
    .venv/bin/python eval/bench_gptq.py                # all three parts, full size (a quiet machine)
    .venv/bin/python eval/bench_gptq.py --only speed --only memory --repeats 5
    .venv/bin/python eval/bench_gptq.py --quick        # every part at small settings, to prove it works

Quality (stories260K): W4 and W3 per channel, symmetric; perplexity on dev.txt [0.5, 1] and WikiText-2
test of the original, RTN (ours), GPTQ (ours) and GPTQ (llm-compressor), all measured here in .venv by
llmslim.evaluate.harness.measure_perplexity on the same tokens; both GPTQs calibrate on the same 128 x
512 tokens of dev.txt [0, 0.5] (built with llmslim's DataHub as the pipeline does, handed to the anchor
as a .pt file, SHA-256 checked), act-order on for both (ours: static groups = llm-compressor's "static").
Speed: a random-weight 8-layer Llama (eval/make_synthetic_llama.py), W4 g128, 64 x 512 tokens, whole
process and quantization phase of each tool, --repeats alternating runs. Memory: the same at 8 and 24
layers, whole-process peak RSS (GNU time) and our gptq stage's own peak. Speed and memory runs use
`export: {check: none}` and no eval. Acceptance lines PASS/FAIL (exit status 1 if one fails).
Output: markdown tables on stdout and eval/results/bench_gptq.json (command, versions of both
environments, machine, every raw number); work files and child logs in --work. Every choice and why:
eval/README.md, section "GPTQ benchmark".
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMSLIM_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K-hf"
DEV = SHARED / "data" / "tinystories" / "dev.txt"
WIKI = SHARED / "data" / "wikitext-2" / "test.txt"
OURS_CLI = REPO / ".venv" / "bin" / "llmslim"
ANCHOR_PY = REPO / ".venv-anchor" / "bin" / "python"
ANCHOR = REPO / "eval" / "anchor_llmcompressor.py"
SYNTH = REPO / "eval" / "make_synthetic_llama.py"
RESULTS = REPO / "eval" / "results" / "bench_gptq.json"
GNU_TIME = Path("/usr/bin/time")

GPTQ = {"symmetric": True, "act_order": True, "dampening": 0.01, "block_size": 128}  # both tools
TIE = 1e-4  # relative perplexity difference treated as equal (same weights, float summation order)
# "Well below RTN": GPTQ removes at least this share of RTN's perplexity increase over the original.
# Measured (128 calibration windows, first 128 eval windows): ~1/3 at W4 on TinyStories, ~1/2+ elsewhere.
GAP_CLOSED = 0.25
SPEED_TARGET, MEMORY_TARGET = 0.8, 1.3


@dataclass(frozen=True)
class Settings:
    quality_samples: int = 128
    eval_windows: int | None = None  # None: every 512-token window of each source
    speed_layers: int = 8
    memory_layers: tuple[int, int] = (8, 24)
    synth_samples: int = 64
    repeats: int = 3


QUICK = Settings(quality_samples=16, eval_windows=16, speed_layers=2, memory_layers=(1, 2), synth_samples=16,
                 repeats=1)


def say(msg: str) -> None:
    print(f"[bench_gptq {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()  # as the anchor hashes them


def spread(values: list[float], digits: int = 1) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f}" if len(values) == 1 else f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ---------------------------------------------------------------- running the tools


def run_child(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run one tool process to completion; its wall time and peak RSS. The peak comes from GNU time,
    not from os.wait4 here: Linux folds the parent's RSS high-water mark into a child's ru_maxrss at
    exec, and this process holds torch and the models it evaluated (a 2 GiB parent makes `python -c
    pass` report 2 GiB). time(1) is small, so what it reports is the tool's own peak."""
    log.parent.mkdir(parents=True, exist_ok=True)
    time_file = log.with_suffix(".time")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run([str(GNU_TIME), "-f", "%M %U %S", "-o", str(time_file), *cmd], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        sys.exit(f"bench_gptq: failed with status {rc}: {shlex.join(cmd)}\n(log: {log})\n{tail}")
    max_kib, user, system = time_file.read_text().split()[-3:]  # the last line; %M is in KiB
    # CPU seconds (user + system) move less than wall time when other users load the machine.
    return {"wall_s": round(wall, 2), "cpu_s": round(float(user) + float(system), 2),
            "peak_rss_bytes": int(max_kib) * 1024, "loadavg_1min_before": round(load, 2), "log": str(log)}


def write_recipe(path: Path, model: Path, output: Path, samples: int, stage: dict[str, Any], check: str) -> str:
    """A recipe calibrating (when the stage takes data) on `samples` x 512 tokens of dev.txt [0, 0.5]."""
    recipe = {"model": str(model), "output": str(output), "seed": 0,
              "data": {"calib": {"path": str(DEV), "fraction": [0.0, 0.5], "samples": samples, "seq_len": 512}},
              "stages": [stage], "export": {"check": check}}
    text = yaml.safe_dump(recipe, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def calibration_tokens(recipe_text: str, out: Path) -> str:
    """The calibration windows llmslim will use for this recipe, saved for the anchor; their SHA-256.
    Built exactly as pipeline.run builds them: DataHub(recipe data, the model's tokenizer, recipe seed,
    max_len = the model's context length), then .calibration(<the stage's source>)."""
    import torch

    from llmslim.data import DataHub
    from llmslim.pipeline import load_tokenizer
    from llmslim.recipe import parse_recipe

    recipe = parse_recipe(recipe_text)
    model = Path(recipe.spec.model)
    context = json.loads((model / "config.json").read_text()).get("max_position_embeddings")
    hub = DataHub(recipe.spec.data, load_tokenizer(model), seed=recipe.spec.seed, max_len=context)
    tokens = hub.calibration(recipe.stages[0].config.data_source())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, out)
    return sha256(tokens)


def run_ours(recipe: Path, output: Path, log: Path) -> dict[str, Any]:
    for old in (output, output.with_name(output.name + ".work")):
        shutil.rmtree(old, ignore_errors=True)  # every run starts from nothing, as the anchor's does
    result = run_child([str(OURS_CLI), "run", str(recipe), "--quiet", "--fresh"], log)
    stage = json.loads((output / "llmslim_report.json").read_text())["stages"][0]
    return {"tool": "ours", **result, "quant_s": stage["seconds"], "stage_peak_rss_bytes": stage["peak_rss_bytes"],
            "gptq_loss_total": stage["notes"].get("gptq_loss_total")}


def run_anchor(model: Path, tokens: Path, token_hash: str, out: Path, bits: int, group_size: int, log: Path,
               dense_out: Path | None = None, observer: str = "minmax", awq: bool = False,
               extra: list[str] | None = None) -> dict[str, Any]:
    """llm-compressor's GPTQ (with `awq`: AWQ then GPTQ, one oneshot) in .venv-anchor on `tokens`. Layers whose
    input width `group_size` does not divide stay unquantized (eval/anchor_llmcompressor.py, --non-divisible);
    `extra`: more eval/anchor_llmcompressor.py flags (e.g. ["--dtype", "float32"])."""
    for old in filter(None, (out, dense_out)):
        shutil.rmtree(old, ignore_errors=True)
    report = out.with_name(out.name + ".json")
    cmd = [str(ANCHOR_PY), str(ANCHOR), "--model", str(model), "--tokens", str(tokens), "--out", str(out),
           "--json", str(report), "--bits", str(bits), "--group-size", str(group_size), "--symmetric",
           "--act-order" if GPTQ["act_order"] else "--no-act-order", "--dampening", str(GPTQ["dampening"]),
           "--block-size", str(GPTQ["block_size"]), "--observer", observer] + (
               ["--dense-out", str(dense_out)] if dense_out else []) + (["--awq"] if awq else []) + list(extra or [])
    result = run_child(cmd, log)
    anchor = json.loads(report.read_text())
    seen = anchor["calibration"]["tokens_sha256"]
    if seen != token_hash:
        sys.exit(f"bench_gptq: the anchor calibrated on other tokens than ours ({seen[:16]} != {token_hash[:16]})")
    return {"tool": "llm-compressor", **result, "quant_s": anchor["timings_s"]["oneshot"],
            "timings_s": anchor["timings_s"], "self_reported_peak_mib": anchor["memory_mib"]["ru_maxrss"],
            "versions": anchor["versions"], "method": anchor.get("method", "gptq")}


AUTOROUND_PY = REPO / ".venv-autoround" / "bin" / "python"  # scripts/setup_anchor.sh autoround
AUTOROUND = REPO / "eval" / "anchor_autoround.py"


def run_autoround(model: Path, tokens: Path, token_hash: str, out: Path, bits: int, group_size: int, log: Path,
                  dense_out: Path | None = None, iters: int = 200, symmetric: bool = True,
                  extra: list[str] | None = None) -> dict[str, Any]:
    """auto-round (SignRound, `iters` steps per block) in .venv-autoround on `tokens`; same return shape as
    run_anchor. `dense_out` gets the dequantized plain checkpoint that .venv loads. Layers whose input width
    `group_size` does not divide stay unquantized, as in run_anchor; `extra`: more eval/anchor_autoround.py
    flags (e.g. ["--non-divisible", "channel"])."""
    for old in filter(None, (out, dense_out)):
        shutil.rmtree(old, ignore_errors=True)
    report = out.with_name(out.name + ".json")
    cmd = [str(AUTOROUND_PY), str(AUTOROUND), "--model", str(model), "--tokens", str(tokens), "--out", str(out),
           "--json", str(report), "--bits", str(bits), "--group-size", str(group_size),
           "--symmetric" if symmetric else "--asymmetric", "--iters", str(iters)] + (
               ["--dense-out", str(dense_out)] if dense_out else []) + list(extra or [])
    result = run_child(cmd, log)
    anchor = json.loads(report.read_text())
    seen = anchor["calibration"]["tokens_sha256"]
    if seen != token_hash:
        sys.exit(f"bench_gptq: auto-round calibrated on other tokens than ours ({seen[:16]} != {token_hash[:16]})")
    return {"tool": "auto-round", **result, "quant_s": anchor["timings_s"]["quantize"],
            "timings_s": anchor["timings_s"], "self_reported_peak_mib": anchor["memory_mib"]["ru_maxrss"],
            "versions": anchor["versions"], "method": anchor["method"]}


# ---------------------------------------------------------------- quality


def dense_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every `.weight` of a checkpoint as transformers in .venv decodes it (quantized ones dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quantized = "quantization_config" in json.loads((model_dir / "config.json").read_text())
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    with warnings.catch_warnings():  # "the checkpoint's quantization_config wins": expected, dequantize is kept
        warnings.simplefilter("ignore", UserWarning)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra)
    return {k: v for k, v in model.state_dict().items() if k.endswith(".weight")}


def weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())[:4]}"
    delta = [(a[k] - b[k]).abs() for k in a]
    return {"elements": sum(d.numel() for d in delta), "differing": sum(int((d > 0).sum()) for d in delta),
            "max_abs": max(float(d.max()) for d in delta)}


def quality(s: Settings, work: Path, runs: list[dict]) -> dict[str, Any]:
    from llmslim.data import DataHub
    from llmslim.evaluate.harness import PplJob, measure_perplexity
    from llmslim.pipeline import load_tokenizer
    from llmslim.progress import Progress
    from llmslim.recipe import DataSource

    tokenizer = load_tokenizer(STORIES)
    sources = {"tinystories dev [0.5, 1]": DataSource(path=str(DEV), fraction=(0.5, 1.0)),
               "wikitext-2 test": DataSource(path=str(WIKI))}
    hub = DataHub(sources, tokenizer, seed=0, max_len=512)
    jobs = [PplJob(name, (lambda n: lambda _tok: hub.stream(n))(name), 512, s.eval_windows) for name in sources]

    def ppl(model_dir: Path) -> dict[str, float]:
        measured = measure_perplexity(model_dir, jobs, "auto", Progress(), model_dir.name, tokenizer)
        return {name: round(m["ppl"], 4) for name, m in measured.items()}

    say("quality: perplexity of the original")
    out: dict[str, Any] = {"sources": {k: v.model_dump() for k, v in sources.items()},
                           "eval_windows": s.eval_windows, "original": ppl(STORIES), "bits": {}}
    for bits in (4, 3):
        q = work / "quality"
        cells: dict[str, Any] = {}
        for method in ("rtn", "gptq"):
            stage = {"method": method, "bits": bits, "group_size": -1, "symmetric": True}
            if method == "gptq":
                stage = {**stage, "data": "calib", **GPTQ}
            output = q / f"ours-{method}-w{bits}"
            text = write_recipe(q / f"ours-{method}-w{bits}.yaml", STORIES, output, s.quality_samples, stage,
                                check="transformers")
            if method == "gptq":
                token_hash = calibration_tokens(text, q / f"calib-w{bits}.pt")
            say(f"quality: W{bits} {method} (ours)")
            run = run_ours(q / f"ours-{method}-w{bits}.yaml", output, work / "logs" / f"quality-ours-{method}-w{bits}.log")
            runs.append({"part": "quality", "bits": bits, "method": method, **run})
            cells[method] = {"dir": str(output), "ppl": ppl(output)}
        say(f"quality: W{bits} gptq (llm-compressor)")
        anchor_dir, dense_dir = q / f"anchor-w{bits}", q / f"anchor-w{bits}-dense"
        run = run_anchor(STORIES, q / f"calib-w{bits}.pt", token_hash, anchor_dir, bits, -1,
                         work / "logs" / f"quality-anchor-w{bits}.log", dense_out=dense_dir)
        runs.append({"part": "quality", "bits": bits, "method": "gptq", **run})
        readable = 32 % bits == 0  # compressed-tensors 0.17 unpacks 0.19's files only for these widths
        evaluated = anchor_dir if readable else dense_dir
        cells["anchor"] = {"dir": str(evaluated), "ppl": ppl(evaluated),
                           "evaluated": "its compressed export" if readable else "its dense copy (see eval/README.md)",
                           "calibration_sha256": token_hash}
        anchor_w = dense_weights(evaluated)
        cells["weights_ours_vs_anchor"] = weight_diff(dense_weights(Path(cells["gptq"]["dir"])), anchor_w)
        if readable:  # the dense path used at W3 decodes exactly what .venv reads from the export
            cells["anchor_dense_copy_vs_export"] = weight_diff(dense_weights(dense_dir), anchor_w)
        out["bits"][bits] = cells
    return out


def quality_report(r: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    lines, checks = [], {}
    for source, fp in r["original"].items():
        rows = []
        for bits, c in r["bits"].items():
            rtn, ours, anchor = c["rtn"]["ppl"][source], c["gptq"]["ppl"][source], c["anchor"]["ppl"][source]
            rows.append([f"W{bits}", f"{fp:.3f}", f"{rtn:.3f}", f"{ours:.3f}", f"{anchor:.3f}"])
            checks[f"W{bits} {source}: ours <= llm-compressor"] = ours <= anchor * (1 + TIE)
            for name, value in (("ours", ours), ("llm-compressor", anchor)):
                share = (rtn - value) / max(rtn - fp, 1e-12)
                checks[f"W{bits} {source}: {name} removes {share:.0%} of RTN's increase (>= {GAP_CLOSED:.0%})"] = (
                    share >= GAP_CLOSED)
        lines += [f"Perplexity on {source} (per channel, symmetric):", "",
                  table(["bits", "original", "RTN (ours)", "GPTQ (ours)", "GPTQ (llm-compressor)"], rows), ""]
    for bits, c in r["bits"].items():
        d = c["weights_ours_vs_anchor"]
        lines.append(f"W{bits}: {d['differing']} of {d['elements']} weights differ between ours and "
                     f"llm-compressor's (max |Δ| {d['max_abs']:.3g}); llm-compressor's column: {c['anchor']['evaluated']}")
        if "anchor_dense_copy_vs_export" in c:
            checks[f"W{bits}: anchor's dense copy == its export"] = c["anchor_dense_copy_vs_export"]["differing"] == 0
    return "\n".join(lines), checks


# ---------------------------------------------------------------- speed and memory


def synthetic(layers: int, work: Path) -> Path:
    out = work / "models" / f"synth-{layers}"
    if not (out / "synthetic.json").is_file():  # cached between runs: same seed, same bits
        say(f"writing the synthetic {layers}-layer Llama")
        subprocess.run([sys.executable, str(SYNTH), "--layers", str(layers), "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def speed_memory(s: Settings, parts: list[str], work: Path, runs: list[dict]) -> dict[str, Any]:
    """Runs both tools on synthetic models; returns {"ours/L8": [runs], "anchor/L8": [...], ...}."""
    timed: dict[tuple[str, int], list[dict]] = {}
    prepared: dict[int, tuple[Path, str]] = {}

    def once(tool: str, layers: int, repeat: int) -> None:
        model, d = synthetic(layers, work), work / "synthetic"
        recipe, output = d / f"ours-L{layers}.yaml", d / f"ours-L{layers}"
        if layers not in prepared:
            stage = {"method": "gptq", "data": "calib", "bits": 4, "group_size": 128, **GPTQ}
            text = write_recipe(recipe, model, output, s.synth_samples, stage, check="none")
            prepared[layers] = (d / f"calib-L{layers}.pt", calibration_tokens(text, d / f"calib-L{layers}.pt"))
        tokens, token_hash = prepared[layers]
        say(f"synthetic L{layers}: {tool} (repeat {repeat + 1})")
        log = work / "logs" / f"synthetic-{tool}-L{layers}-{repeat + 1}.log"
        run = (run_ours(recipe, output, log) if tool == "ours" else
               run_anchor(model, tokens, token_hash, d / f"anchor-L{layers}", 4, 128, log))
        run = {"part": "synthetic", "layers": layers, "repeat": repeat + 1, **run}
        runs.append(run)
        timed.setdefault((tool, layers), []).append(run)

    if "speed" in parts:
        for r in range(s.repeats):  # alternate who goes first, so drift in the machine's load is shared
            for tool in (("ours", "anchor") if r % 2 == 0 else ("anchor", "ours")):
                once(tool, s.speed_layers, r)
    if "memory" in parts:
        for layers in s.memory_layers:
            for tool in ("ours", "anchor"):
                if (tool, layers) not in timed:
                    once(tool, layers, 0)
    return {f"{tool}/L{layers}": v for (tool, layers), v in timed.items()}


def speed_report(s: Settings, r: dict[str, list[dict]]) -> tuple[str, dict[str, bool]]:
    ours, anchor = r[f"ours/L{s.speed_layers}"], r[f"anchor/L{s.speed_layers}"]
    rows = [[name, len(x), *(spread([v[k] for v in x]) for k in ("wall_s", "cpu_s", "quant_s")),
             spread([v["peak_rss_bytes"] / 2**20 for v in x], 0)]
            for name, x in (("ours", ours), ("llm-compressor", anchor))]
    ratio = {k: statistics.median(v[k] for v in ours) / statistics.median(v[k] for v in anchor)
             for k in ("wall_s", "quant_s")}
    text = (f"Speed: synthetic {s.speed_layers}-layer Llama, W4 g128 symmetric, act-order, {s.synth_samples} x 512 "
            "tokens; median (min–max)\n\n"
            + table(["tool", "runs", "whole process (s)", "its CPU time (s)", "quantization phase (s)",
                     "peak RSS (MiB)"], rows)
            + f"\n\nours / llm-compressor: whole process {ratio['wall_s']:.2f}, quantization phase "
              f"{ratio['quant_s']:.2f} (target: whole process <= {SPEED_TARGET})")
    return text, {f"speed: whole process ours/llm-compressor {ratio['wall_s']:.2f} <= {SPEED_TARGET}":
                  ratio["wall_s"] <= SPEED_TARGET}


def memory_report(s: Settings, r: dict[str, list[dict]]) -> tuple[str, dict[str, bool]]:
    lo, hi = s.memory_layers

    def mib(tool: str, layers: int, key: str) -> float:
        return statistics.median(v[key] for v in r[f"{tool}/L{layers}"]) / 2**20

    rows = []
    for name, tool, key in (("ours (whole process)", "ours", "peak_rss_bytes"),
                            ("ours (gptq stage)", "ours", "stage_peak_rss_bytes"),
                            ("llm-compressor (whole process)", "anchor", "peak_rss_bytes")):
        a, b = mib(tool, lo, key), mib(tool, hi, key)
        rows.append([name, f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}"])
    text = (f"Memory: peak RSS (MiB, median of the runs), synthetic Llama at {lo} and {hi} layers\n\n"
            + table(["", f"{lo} layers", f"{hi} layers", "ratio"], rows))
    growth = mib("ours", hi, "peak_rss_bytes") / mib("ours", lo, "peak_rss_bytes")
    return text, {f"memory: ours({hi} layers) / ours({lo} layers) {growth:.2f} <= {MEMORY_TARGET}":
                  growth <= MEMORY_TARGET}


# ---------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    import psutil
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    return {"platform": platform.platform(), "cpu": model, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "ram_bytes": psutil.virtual_memory().total,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", choices=["quality", "speed", "memory"],
                   help="run only this part (repeatable); default: all three")
    p.add_argument("--repeats", type=int, help="timed runs of each tool for speed (default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="small settings: 16 calibration windows, 16 eval windows, 2-layer speed model, memory at 1 "
                        "and 2 layers")
    p.add_argument("--work", type=Path, default=REPO / "eval" / "results" / "bench_gptq",
                   help="exports, tokens, synthetic models and child logs (default: eval/results/bench_gptq)")
    args = p.parse_args(argv)
    # No progress bars from tqdm (read when tqdm is imported, hence before torch), here and in the children.
    os.environ.setdefault("TQDM_DISABLE", "1")
    parts = args.only or ["quality", "speed", "memory"]
    s = QUICK if args.quick else Settings()
    if args.repeats is not None:
        if args.repeats < 1:
            p.error("--repeats must be at least 1")
        s = replace(s, repeats=args.repeats)
    missing = [str(x) for x in (OURS_CLI, ANCHOR_PY, GNU_TIME, STORIES, DEV, WIKI) if not x.exists()]
    if missing:
        sys.exit("bench_gptq: missing " + ", ".join(missing) + " (scripts/setup_anchor.sh makes .venv-anchor; "
                 "GNU time: apt-get install time; the data: ../shared or $LLMSLIM_SHARED)")
    from llmslim.report import versions

    started = time.perf_counter()
    runs: list[dict] = []
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]), "created": dt.datetime.now().isoformat(timespec="seconds"),
        "parts": parts, "settings": asdict(s), "gptq": GPTQ, "machine_before": machine(),
        "versions": {"ours (.venv)": versions()}, "runs": runs}
    done: list[tuple[str, dict[str, bool]]] = []  # (markdown, acceptance checks) of each part
    if "quality" in parts:
        result["quality"] = quality(s, args.work, runs)
        done.append(quality_report(result["quality"]))
    if "speed" in parts or "memory" in parts:
        timed = speed_memory(s, parts, args.work, runs)
        if "speed" in parts:
            done.append(speed_report(s, timed))
        if "memory" in parts:
            done.append(memory_report(s, timed))
    checks = {name: ok for _, part in done for name, ok in part.items()}
    anchor_run = next(r for r in runs if r["tool"] == "llm-compressor")
    result["versions"]["llm-compressor (.venv-anchor)"] = anchor_run["versions"]
    result["machine_after"] = machine()
    result["acceptance"] = checks
    result["seconds"] = round(time.perf_counter() - started, 1)
    lines = [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
    note = " (--quick: small settings, not the benchmark's verdict)" if args.quick else ""
    print("\n\n".join([text for text, _ in done] + [f"Acceptance{note}:\n\n" + "\n".join(lines)]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, default=str) + "\n")
    say(f"done in {result['seconds']:.0f} s; {RESULTS.relative_to(REPO)} written")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
