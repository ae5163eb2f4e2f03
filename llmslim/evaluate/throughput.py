"""Offline serving benchmark: one model, one backend (vLLM or transformers), several batch sizes.

Every measurement runs in a child process (`llmslim.evaluate.worker`), one per model and backend, so
peak memory is the model's own and vLLM never runs in the caller. For each batch size B the child does
`warmup` untimed runs, then `repeats` timed runs; each run submits B requests of `prompt_len` random
token ids at once and generates `gen_len` tokens for each (greedy, EOS ignored; vLLM's own benchmarks
use random-token prompts too). Prompts differ between runs and vLLM's prefix cache is off, so no run
reuses another's work.

Per timed run (times from submission; a request's "delivery" is when the engine hands it new tokens):
- TTFT of a request: its first delivery. ITL: the gaps between a request's successive deliveries.
- prefill time: the last request's TTFT (every prompt processed); prefill tok/s = B x prompt_len / it.
- decode time: from the end of prefill to the last delivery; decode tok/s = the tokens delivered in that
  interval / its length. Tokens an early request generated while a later prompt was still being
  prefilled fall before it and are not counted, so decode tok/s never contains prefill work.
- e2e: submission to the end of the run; requests/s = B / e2e; output tok/s = B x gen_len / e2e.
Across the timed runs the report gives each of those rates as median, min and max (report.md marks a
rate whose runs differ by more than UNSTABLE x, and gives the machine's load average beside it); TTFT and ITL are
pooled over all requests and gaps of all timed runs and given as p50, p95 (linear interpolation, as
numpy) and mean.

Memory: peak resident memory of the child and its children (vLLM's engine core and workers) while
loading and while running each batch size, plus the RSS of the child before loading (Python, torch).
With transformers the difference is the model, its activations and KV cache; with vLLM it also holds
the engine processes' own runtime and the KV cache the engine reserves (VLLM_CPU_KVCACHE_SPACE on CPU),
so compare vLLM peaks between models, not with transformers. On a GPU: device memory from NVML (vLLM,
which reserves `gpu_memory_utilization` of the device up front) or torch's peak allocation
(transformers). For vLLM also the KV-cache capacity the engine resolved (blocks x block size = tokens,
and how many requests of prompt_len + gen_len tokens fit at once).

`dtype` in the result is what the backend actually computed in ("auto" lets vLLM pick its serving dtype
and transformers keep the checkpoint's; exports whose vLLM kernels on this machine take 16-bit
activations only, such as W8A8 on AMX CPUs, are started in bf16/fp16: see `vllm_dtype`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from ..cpu import head_dim_problem
from ..errors import UserError
from ..progress import Progress
from ..serve import head_dim, text_config
from .worker import PROGRESS_PREFIX

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "transformers")
SPEC_BACKEND = "vllm+draft"  # the report's entry of vLLM with speculative decoding (`llmslim eval --draft`)


@dataclass(frozen=True)
class ThroughputSettings:
    """What to measure: the same for every model of one evaluation."""

    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    gen_len: int = 128
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None  # None: 0.3 on CPU, 0.9 on a GPU
    enforce_eager: bool | None = None  # None: eager on CPU (start-up), CUDA graphs on a GPU
    timeout_s: float = 3600.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def special_ids(model_dir: Path) -> list[int]:
    """Token ids that random prompts avoid: BOS/EOS/PAD from config.json and generation_config.json."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        p = model_dir / name
        if not p.is_file():
            continue
        cfg = text_config(json.loads(p.read_text()))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = cfg.get(key)
            ids |= set(v) if isinstance(v, list) else ({v} if isinstance(v, int) else set())
    return sorted(ids)


def vllm_dtype(model_dir: Path, requested: str) -> tuple[str, str | None]:
    """The dtype to start vLLM with for this export here, or (requested, why it cannot run): exports whose
    kernels take 16-bit activations only (llmslim.cpu's tables) run in 16 bits when "auto" was asked."""
    from ..check import vllm_run_for

    plan = vllm_run_for(model_dir)
    if not plan.generates:
        return requested, plan.why
    if plan.dtype == "float32":  # no constraint: as asked
        return requested, None
    if requested == "float32":
        return requested, f"--dtype float32: {plan.why}; use --dtype auto, bfloat16 or float16"
    return (plan.dtype if requested == "auto" else requested), None


def cannot_run(model_dir: Path, backend: str, settings: ThroughputSettings, gpu: bool,
               draft: Path | None = None) -> str | None:
    """Why this backend cannot benchmark this model here (None when it can): checked up front, so a
    doomed engine start costs nothing."""
    cfg = text_config(_config(model_dir))
    context = cfg.get("max_position_embeddings")
    need = settings.prompt_len + settings.gen_len
    if context and need > context:
        return (f"prompt_len + gen_len = {need} exceeds the model's context ({context}); lower --prompt-len or "
                "--gen-len")
    if backend != "vllm":
        return None
    if not gpu and (problem := head_dim_problem(head_dim(cfg))):
        return f"{problem}; use --backend transformers or a GPU"
    if draft is not None and not gpu and (problem := head_dim_problem(head_dim(_config(draft)))):
        return f"the draft's {problem}"
    return vllm_dtype(model_dir, settings.dtype)[1]


def make_job(model_dir: Path, backend: str, settings: ThroughputSettings, gpu: bool,
             speculative: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = text_config(_config(model_dir))
    dtype = vllm_dtype(model_dir, settings.dtype)[0] if backend == "vllm" else settings.dtype
    return {
        "backend": backend, "model": str(model_dir), "dtype": dtype,
        "batch_sizes": list(settings.batch_sizes), "prompt_len": settings.prompt_len, "gen_len": settings.gen_len,
        "repeats": settings.repeats, "warmup": settings.warmup, "seed": settings.seed,
        "vocab_size": cfg["vocab_size"], "avoid_ids": special_ids(model_dir), "device": "cuda" if gpu else "cpu",
        "vllm": {"gpu_memory_utilization": settings.gpu_memory_utilization or (0.9 if gpu else 0.3),
                 "enforce_eager": (not gpu) if settings.enforce_eager is None else settings.enforce_eager},
        "speculative": speculative,
    }


# ---------------------------------------------------------------- the child process


def run_child(job: dict[str, Any], progress: Progress, label: str, timeout: float,
              log_file: Path | None = None) -> dict[str, Any]:
    """Run one worker job; its output goes to `log_file` (when given), its progress lines to a task."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    total = 1 + len(job["batch_sizes"]) * (job["warmup"] + job["repeats"])
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with tempfile.TemporaryDirectory(prefix="llmslim-bench-") as tmp, progress.track(label, total) as task:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        # A new session: on a timeout the whole tree (vLLM's engine processes too) is ended together.
        proc = subprocess.Popen([sys.executable, "-m", "llmslim.evaluate.worker", str(job_path), str(out_path)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            _kill_group(proc)

        timer = threading.Timer(timeout, kill)
        timer.start()
        sink = log_file.open("w") if log_file else None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    task.advance()
                    continue
                tail.append(line.rstrip())
                if sink:
                    sink.write(line)
            proc.wait()
        finally:
            timer.cancel()
            if sink:
                sink.close()
            _kill_group(proc)  # engine processes the worker left behind, if any
        if timed_out.is_set():
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        if not out_path.is_file():
            lines = [t for t in tail if t.strip()][-3:]
            return {"ok": False, "error": f"worker exited with code {proc.returncode}: " + " | ".join(lines)}
        return json.loads(out_path.read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": median(values), "min": min(values), "max": max(values)}


def distribution(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95),
            "mean": sum(values) / len(values) if values else None, "count": len(values)}


def run_metrics(run: dict[str, Any], prompt_len: int, gen_len: int) -> dict[str, Any]:
    """Rates and latencies of one timed run (see the module docstring)."""
    reqs = run["requests"]
    b = len(reqs)
    ttft = [r["times"][0] for r in reqs if r["times"]]
    itl = [t1 - t0 for r in reqs for t0, t1 in zip(r["times"], r["times"][1:])]
    e2e = run["e2e_s"]
    prefill = max(ttft) if len(ttft) == b and ttft else None  # a request with no token: no prefill time
    last = max((t for r in reqs for t in r["times"]), default=None)
    decode_tokens = decode = None
    if prefill is not None and last is not None:
        decode = last - prefill
        decode_tokens = sum(n for r in reqs for t, n in zip(r["times"], r["tokens"]) if t > prefill)
    return {
        "ttft": ttft, "itl": itl, "prefill_s": prefill, "decode_s": decode, "e2e_s": e2e,
        "prefill_tok_s": b * prompt_len / prefill if prefill else None,
        "decode_tok_s": decode_tokens / decode if decode and decode_tokens else None,
        "output_tok_s": b * gen_len / e2e if e2e > 0 else None,
        "requests_s": b / e2e if e2e > 0 else None,
        "output_tokens": sum(sum(r["tokens"]) for r in reqs),
    }


UNSTABLE = 1.5  # max / min of a rate's timed runs above which report.md flags it as noisy
RATES = ("prefill_tok_s", "decode_tok_s", "output_tok_s", "requests_s", "e2e_s")


def summarize(raw: dict[str, Any], settings: ThroughputSettings) -> dict[str, Any]:
    """The report entry of one model and backend from the worker's raw result."""
    if not raw.get("ok"):
        return {"ok": False, "error": raw.get("error", "unknown error")}
    batches = []
    for b in raw["batches"]:
        ms = [run_metrics(r, settings.prompt_len, settings.gen_len) for r in b["runs"]]
        entry: dict[str, Any] = {"batch_size": b["batch_size"], "runs": len(ms)}
        for key in RATES:
            entry[key] = spread([m[key] for m in ms if m[key] is not None])
        entry["ttft_s"] = distribution([t for m in ms for t in m["ttft"]])
        entry["itl_s"] = distribution([t for m in ms for t in m["itl"]])
        entry["output_tokens"] = sum(m["output_tokens"] for m in ms)
        entry["peak_rss_bytes"] = b["peak_rss_bytes"]
        entry["peak_device_bytes"] = b["peak_device_bytes"]
        digests = [r.get("tokens_sha256") for r in b["runs"]]
        entry["tokens_sha256"] = None if None in digests else hashlib.sha256("".join(digests).encode()).hexdigest()
        specs = [r["spec"] for r in b["runs"] if r.get("spec")]
        if specs:  # speculative decoding: the timed runs' spec-decode counters, summed
            from ..draft import acceptance

            entry["speculative"] = acceptance(*(sum(s[k] for s in specs)
                                                for k in ("drafts", "draft_tokens", "accepted_tokens")))
        batches.append(entry)
    peaks = [b["peak_rss_bytes"] for b in raw["batches"]] + [raw["load_peak_rss_bytes"]]
    device_peaks = [p for p in [raw.get("load_peak_device_bytes")] + [b["peak_device_bytes"] for b in raw["batches"]]
                    if p is not None]
    loads = [x for x in raw.get("load_avg") or [] if x is not None]
    return {"ok": True, "error": None, "dtype": raw.get("dtype"), "cpus": os.cpu_count(),
            "load_avg": {"min": min(loads), "max": max(loads)} if loads else None,
            "load_seconds": raw["load_seconds"],
            "base_rss_bytes": raw["base_rss_bytes"],
            "peak_rss_bytes": max(peaks), "peak_device_bytes": max(device_peaks) if device_peaks else None,
            "kv_cache": raw.get("kv_cache"), "batches": batches}


def benchmark(model_dir: str | Path, backend: str, settings: ThroughputSettings, progress: Progress | None = None,
              *, label: str | None = None, log_file: Path | None = None,
              speculative: dict[str, Any] | None = None) -> dict[str, Any]:
    """Benchmark one model with one backend; returns its report entry ({ok: false, error} when it cannot
    run here or fails, so that one model's failure does not lose the others' results). `speculative`:
    vLLM's speculative_config (a draft model; llmslim.draft), whose acceptance each batch then reports."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: unknown backend; choose from {', '.join(BACKENDS)}")
    d = Path(model_dir)
    gpu = gpu_available()
    draft = Path(speculative["model"]) if speculative else None
    why = cannot_run(d, backend, settings, gpu, draft)
    if why:
        log.warning("%s: %s throughput skipped: %s", d, backend, why)
        return {"ok": False, "error": why}
    started = time.perf_counter()
    raw = run_child(make_job(d, backend, settings, gpu, speculative), progress or Progress(),
                    f"throughput {backend}{' + draft' if speculative else ''}: {label or d.name}", settings.timeout_s,
                    log_file)
    out = summarize(raw, settings)
    if speculative and out["ok"]:
        out["speculative"] = dict(speculative)
    if not out["ok"]:
        log.warning("%s: %s throughput failed: %s%s", d, backend, out["error"],
                    f" (log: {log_file})" if log_file else "")
    else:
        log.info("%s: %s throughput measured in %.0f s", d.name, backend, time.perf_counter() - started)
    return out
