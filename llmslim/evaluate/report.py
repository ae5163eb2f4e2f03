"""The evaluation report: report.json (schema below), report.md (tables with ratios), per-model records.

report.json, schema "llmslim-eval/1" (fields are only ever added within a version; a renamed or removed
field bumps the version). Sizes are bytes, times seconds, rates per second.

    schema        "llmslim-eval/1"
    created       ISO-8601 UTC time of the evaluation
    command       the command line (`llmslim eval ...`) or "recipe <file>"
    environment   {device: "cpu (N cores)" | "cuda: <name>", gpu: bool, versions: {package: version}}
    settings
      perplexity  {sources: [label], seq_len: int (requested; each result says what was used),
                   stride: int | null, samples: int | null, dtype: str} | null
      throughput  {backends: [str], batch_sizes: [int], prompt_len, gen_len, repeats, warmup, seed,
                   dtype, gpu_memory_utilization, enforce_eager, timeout_s,
                   draft, num_speculative_tokens (with `--draft` only)} | null
      tasks       {names: [str], limit, num_fewshot, batch_size} | null
    baseline      name of the baseline model | null
    models        [model], the baseline first
      name, path, role ("baseline" | "model")
      size        {params, disk_bytes, dir_bytes, weight_bytes, bytes_per_param, weight_memory_ratio,
                   quantization: str | null}                                  (see evaluate.size)
      perplexity  {label: {ppl, nll (mean nats per scored token), tokens (scored), windows, seq_len (used),
                   stride: int | null (used), source: label, dtype (computed in),
                   activation_quant: str | null}}                             (see perplexity)
      throughput  {backend: {ok: bool, error: str | null, dtype (computed in), cpus: int,
                   load_avg: {min, max} | null (1-minute load average around the timed runs), load_seconds,
                   base_rss_bytes, peak_rss_bytes, peak_device_bytes: int | null,
                   kv_cache: {blocks, block_size, tokens (= blocks x block_size), max_model_len,
                             max_concurrency (requests of max_model_len tokens that fit),
                             cache_dtype} | null (vLLM only),
                   batches: [{batch_size, runs, output_tokens,
                              prefill_tok_s, decode_tok_s, output_tok_s, requests_s, e2e_s:
                                  {median, min, max},
                              ttft_s, itl_s: {p50, p95, mean, count},
                              peak_rss_bytes, peak_device_bytes,
                              tokens_sha256: str | null (vLLM: hash of the generated ids of the timed runs),
                              speculative: {drafts, draft_tokens, accepted_tokens, acceptance_rate,
                                            mean_accepted_length} (vllm+draft only)}],
                   speculative: vLLM's speculative_config (vllm+draft only)}}   (see evaluate.throughput;
                   backend "vllm+draft": vLLM with the `--draft` model, see llmslim.draft)
      tasks       {task: {"metric,filter": number}}  (lm-evaluation-harness's names, e.g. "acc,none",
                   "acc_stderr,none")
      vs_baseline {key: model value / baseline value} | null, keys:
                   size.{params,disk_bytes,weight_bytes}, perplexity.<label>,
                   throughput.<backend>.b<B>.{prefill_tok_s,decode_tok_s,output_tok_s,requests_s}
                   (medians), throughput.<backend>.b<B>.{ttft_p50,itl_p50},
                   throughput.<backend>.{peak_rss_bytes,kv_cache_tokens}, tasks.<task>.<metric>
                   (not for *_stderr metrics: a ratio of standard errors means nothing)

Beside it in the output directory: report.md, models/<name>-<hash>.json (one record per model ever
evaluated into the directory: the model entry plus its settings, for the perplexity-vs-size plot) and
the PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..report import human_bytes, human_count

SCHEMA = "llmslim-eval/1"
RATE_KEYS = ("prefill_tok_s", "decode_tok_s", "output_tok_s", "requests_s")


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def _flat(model: dict[str, Any]) -> dict[str, float]:
    """The comparable numbers of one model entry, under the vs_baseline keys."""
    out: dict[str, Any] = {}
    size = model.get("size") or {}
    for k in ("params", "disk_bytes", "weight_bytes"):
        out[f"size.{k}"] = size.get(k)
    for label, p in (model.get("perplexity") or {}).items():
        out[f"perplexity.{label}"] = p.get("ppl")
    for backend, t in (model.get("throughput") or {}).items():
        if not t.get("ok"):
            continue
        for b in t["batches"]:
            pre = f"throughput.{backend}.b{b['batch_size']}"
            for k in RATE_KEYS:
                out[f"{pre}.{k}"] = b[k]["median"]
            out[f"{pre}.ttft_p50"] = b["ttft_s"]["p50"]
            out[f"{pre}.itl_p50"] = b["itl_s"]["p50"]
        out[f"throughput.{backend}.peak_rss_bytes"] = t["peak_rss_bytes"]
        out[f"throughput.{backend}.kv_cache_tokens"] = (t.get("kv_cache") or {}).get("tokens")
    for task, metrics in (model.get("tasks") or {}).items():
        for m, v in metrics.items():
            if "_stderr" not in m:
                out[f"tasks.{task}.{m}"] = v
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def add_ratios(models: list[dict[str, Any]]) -> None:
    """Fill each non-baseline model's `vs_baseline` (model / baseline for every shared number)."""
    base = next((m for m in models if m["role"] == "baseline"), None)
    ref = _flat(base) if base else {}
    for m in models:
        if m["role"] == "baseline" or base is None:
            m["vs_baseline"] = None
            continue
        mine = _flat(m)
        m["vs_baseline"] = {k: r for k, v in mine.items() if (r := _ratio(v, ref.get(k))) is not None}


def record_name(model: dict[str, Any]) -> str:
    """File name of a model's record: its name plus a hash of its path (two `out/` dirs do not collide)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model["name"])[:60]
    return f"{safe}-{hashlib.sha256(str(Path(model['path']).resolve()).encode()).hexdigest()[:8]}.json"


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.json, report.md and one record per model; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = out_dir / "models"
    records.mkdir(exist_ok=True)
    written = []
    for m in report["models"]:
        rec = records / record_name(m)
        rec.write_text(json.dumps({"schema": SCHEMA, "created": report["created"], "settings": report["settings"],
                                   "model": m}, indent=2) + "\n")
        written.append(rec)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return [out_dir / "report.json", out_dir / "report.md", *written]


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every model record in the directory (each model evaluated into it, newest record per model)."""
    out = []
    for p in sorted((out_dir / "models").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if str(rec.get("schema", "")).startswith("llmslim-eval/"):
            out.append(rec)
    return out


# ---------------------------------------------------------------- markdown


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    return f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else f"{v:.3g}"


def _noisy(s: dict[str, Any] | None) -> bool:
    """Whether a rate's timed runs differ by more than UNSTABLE x (max / min)."""
    from .throughput import UNSTABLE

    return bool(s and s.get("min") and s["max"] / s["min"] > UNSTABLE)


def _spread(s: dict[str, Any] | None) -> str:
    if not s or s.get("median") is None:
        return "-"
    med, lo, hi = (s[k] for k in ("median", "min", "max"))
    text = f"{_num(med)} ({_num(lo)}–{_num(hi)})" if lo != hi else _num(med)
    return text + (" †" if _noisy(s) else "")


def _x(r: float | None) -> str:
    return f"{r:.3f}x" if r is not None else "-"


class _Table:
    """A markdown table with one value column per model and, after the first, a ratio column."""

    def __init__(self, first: str, models: list[dict[str, Any]], compare: bool):
        self.models, self.compare = models, compare
        head = [first]
        for i, m in enumerate(models):
            head.append(m["name"] + (" (baseline)" if m["role"] == "baseline" else ""))
            if compare and i > 0:
                head.append(f"{m['name']} / {models[0]['name']}")
        self.lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]

    def row(self, label: str, values: list[Any], text: list[str] | None = None) -> None:
        shown = text or [_num(v) for v in values]
        cells = [label]
        for i, s in enumerate(shown):
            cells.append(s)
            if self.compare and i > 0:
                cells.append(_x(_ratio(values[i], values[0])))
        self.lines.append("| " + " | ".join(cells) + " |")


def _speculative_lines(models: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """The speculative-decoding summary: per model and batch size, vLLM's tokens/s without and with the draft
    and vLLM's acceptance counters of the runs with it."""
    from .throughput import SPEC_BACKEND

    measured = [m for m in models if ((m.get("throughput") or {}).get(SPEC_BACKEND) or {}).get("ok")]
    if not measured:
        return []
    lines = ["## Speculative decoding", "",
             f"Draft `{settings.get('draft')}` proposing {settings.get('num_speculative_tokens')} tokens per step; "
             "output tok/s (median) of vLLM without and with it. Acceptance rate: accepted / proposed draft tokens; "
             "mean accepted length: tokens per target step (1 + accepted / drafts), from vLLM's spec-decode "
             "counters over the timed runs. Same tokens: the greedy tokens generated with the draft equal those "
             "without it on the same prompts (speculative decoding must not change them).", "",
             "| model · batch | output tok/s without | output tok/s with | speed-up | acceptance rate | "
             "mean accepted length | same tokens |", "|---|---:|---:|---:|---:|---:|---|"]
    for m in measured:
        plain, spec = m["throughput"].get("vllm") or {}, m["throughput"][SPEC_BACKEND]
        for b in spec["batches"]:
            p = next((x for x in plain.get("batches", []) if x["batch_size"] == b["batch_size"]), None) \
                if plain.get("ok") else None
            without, with_ = (p["output_tok_s"]["median"] if p else None), b["output_tok_s"]["median"]
            acc = b.get("speculative") or {}
            rate = acc.get("acceptance_rate")
            same = "-" if not (p and p.get("tokens_sha256") and b.get("tokens_sha256")) else \
                "yes" if p["tokens_sha256"] == b["tokens_sha256"] else "NO"
            lines.append(f"| {m['name']} · B={b['batch_size']} | {_num(without)} | {_num(with_)} | "
                         f"{_x(_ratio(with_, without))} | {'-' if rate is None else f'{rate:.1%}'} | "
                         f"{_num(acc.get('mean_accepted_length'))} | {same} |")
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: size, perplexity, throughput and task tables; ratios against the baseline."""
    models = report["models"]
    compare = report.get("baseline") is not None and len(models) > 1
    env = report["environment"]
    lines = ["# llmslim eval", "",
             "Models: " + ", ".join(f"`{m['name']}` ({m['path']}){' — baseline' if m['role'] == 'baseline' else ''}"
                                    for m in models) + ".",
             f"Device: {env['device']}. Created {report['created']}.", ""]
    if compare:
        lines += [f"Ratios are model / baseline (`{models[0]['name']}`). Lower is better for sizes, memory, "
                  "perplexity and latencies (TTFT, ITL); higher is better for rates (tokens/s, requests/s).", ""]

    t = _Table("size", models, compare)
    sizes = [m.get("size") or {} for m in models]
    t.row("parameters", [s.get("params") for s in sizes], [human_count(s.get("params")) for s in sizes])
    t.row("bytes on disk (safetensors)", [s.get("disk_bytes") for s in sizes],
          [human_bytes(s.get("disk_bytes")) for s in sizes])
    t.row("weight memory", [s.get("weight_bytes") for s in sizes], [human_bytes(s.get("weight_bytes")) for s in sizes])
    t.row("bytes / parameter", [s.get("bytes_per_param") for s in sizes])
    t.row("weight memory vs 16-bit", [s.get("weight_memory_ratio") for s in sizes])
    t.row("quantization", [None] * len(models), [s.get("quantization") or "none" for s in sizes])
    lines += ["## Size", "", *t.lines, ""]

    labels = list(dict.fromkeys(k for m in models for k in (m.get("perplexity") or {})))
    if labels:
        t = _Table("source (windows x seq_len, stride)", models, compare)
        for label in labels:
            ps = [(m.get("perplexity") or {}).get(label) for m in models]
            first = next(p for p in ps if p)
            desc = f"{label} ({first['windows']} x {first['seq_len']}, stride {first['stride'] or 'none'})"
            t.row(desc, [p["ppl"] if p else None for p in ps], [f"{p['ppl']:.4f}" if p else "-" for p in ps])
        lines += ["## Perplexity", "", *t.lines, ""]
        dtypes = sorted({p.get("dtype") or "?" for m in models for p in (m.get("perplexity") or {}).values()})
        lines += [f"Computed in transformers, {', '.join(dtypes)}; each window scored on its own (its first token "
                  "has no context and is not scored; with a stride, only tokens no earlier window scored).", ""]
        notes = {m["name"]: p["activation_quant"] for m in models for p in (m.get("perplexity") or {}).values()
                 if p.get("activation_quant")}
        for name, note in notes.items():
            lines += [f"`{name}`: activations quantized during perplexity ({note}), as vLLM serves it.", ""]

    backends = list(dict.fromkeys(b for m in models for b in (m.get("throughput") or {})))
    for backend in backends:
        ts = [(m.get("throughput") or {}).get(backend) or {"ok": False, "error": "not measured"} for m in models]
        lines += [f"## Throughput ({backend})", ""]
        if not any(x.get("ok") for x in ts):
            lines += [f"`{m['name']}` not measured with {backend}: {x.get('error')}" for m, x in zip(models, ts)]
            lines.append("")
            continue
        settings = report["settings"].get("throughput") or {}
        lines += [f"Random-token prompts of {settings.get('prompt_len')} tokens, {settings.get('gen_len')} generated "
                  f"tokens each (greedy, EOS ignored); {settings.get('warmup')} warm-up run(s) excluded, "
                  f"{settings.get('repeats')} timed runs: median (min–max); TTFT and ITL: p50 / p95 over all "
                  "requests and token gaps.", ""]
        t = _Table("batch · metric", models, compare)
        sizes_b = sorted({b["batch_size"] for x in ts if x.get("ok") for b in x["batches"]})
        for bs in sizes_b:
            rows = [next((b for b in x["batches"] if b["batch_size"] == bs), None) if x.get("ok") else None for x in ts]
            for key, name in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
                              ("requests_s", "requests/s")):
                t.row(f"B={bs} · {name}", [r[key]["median"] if r else None for r in rows],
                      [_spread(r[key]) if r else "-" for r in rows])
            for key, name in (("ttft_s", "TTFT ms p50 / p95"), ("itl_s", "ITL ms p50 / p95")):
                t.row(f"B={bs} · {name}", [r[key]["p50"] if r else None for r in rows],
                      [f"{_num(r[key]['p50'] * 1e3)} / {_num(r[key]['p95'] * 1e3)}" if r and r[key]["p50"] is not None
                       else "-" for r in rows])
            t.row(f"B={bs} · peak RSS (process tree)", [r["peak_rss_bytes"] if r else None for r in rows],
                  [human_bytes(r["peak_rss_bytes"]) if r else "-" for r in rows])
        ok = [x if x.get("ok") else None for x in ts]
        t.row("computed in", [None] * len(ok), [str(x.get("dtype") or "-") if x else "-" for x in ok])
        t.row("RSS before loading the model", [x["base_rss_bytes"] if x else None for x in ok],
              [human_bytes(x["base_rss_bytes"]) if x else "-" for x in ok])
        if any(x and x.get("peak_device_bytes") is not None for x in ok):
            t.row("peak device memory", [x["peak_device_bytes"] if x else None for x in ok],
                  [human_bytes(x["peak_device_bytes"]) if x else "-" for x in ok])
        if backend == "vllm":
            kv = [(x.get("kv_cache") or {}) if x else {} for x in ok]
            t.row("KV cache (tokens)", [k.get("tokens") for k in kv])
            t.row("KV cache (concurrent requests)", [k.get("max_concurrency") for k in kv])
        t.row("load seconds", [x["load_seconds"] if x else None for x in ok])
        lines += t.lines + [""]
        noisy = any(_noisy(b[k]) for x in ok if x for b in x["batches"] for k in RATE_KEYS)
        loads = [x["load_avg"] for x in ok if x and x.get("load_avg")]
        if loads:
            cpus = next((x.get("cpus") for x in ok if x and x.get("cpus")), None)
            lines += [f"Machine load average during the runs: {_num(min(v['min'] for v in loads))}–"
                      f"{_num(max(v['max'] for v in loads))}" + (f" on {cpus} CPUs" if cpus else "") + "."
                      + (" † the timed runs of this rate differ by more than 1.5x: other work was competing for the "
                         "machine, so its ratios are not reliable; rerun on a quiet machine or with more --repeats."
                         if noisy else ""), ""]
        for m, x in zip(models, ts):
            if not x.get("ok"):
                lines += [f"`{m['name']}` not measured with {backend}: {x.get('error')}", ""]

    lines += _speculative_lines(models, report["settings"].get("throughput") or {})
    tasks = list(dict.fromkeys(k for m in models for k in (m.get("tasks") or {})))
    if tasks:
        t = _Table("task · metric", models, compare)
        for task in tasks:
            metrics = list(dict.fromkeys(k for m in models for k in ((m.get("tasks") or {}).get(task) or {})))
            for metric in metrics:
                t.row(f"{task} · {metric}", [((m.get("tasks") or {}).get(task) or {}).get(metric) for m in models])
        lines += ["## Downstream tasks (lm-evaluation-harness)", "", *t.lines, ""]
    versions = env.get("versions", {})
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)
