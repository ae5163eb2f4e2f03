"""vLLM decode throughput of an eora export with and without its adapter (issue [28]), in .venv:

    .venv/bin/python eval/eora_throughput.py --export OUT [--batch-sizes 1,16] [--json result.json]

Both variants run llmslim's own throughput worker (llmslim.evaluate.worker: random-token prompts, exactly
--gen-len tokens per request, warm-up excluded, medians of the timed runs), each in its own process:
"base" serves the quantized base alone, as `llmslim eval --throughput --backend vllm` does (its worker
never enables LoRA, so on an eora export that command measures the base only); "base + eora" serves the
same base with `enable_lora=True, max_lora_rank=R, max_loras=1` and every request carrying the adapter's
LoRARequest, as `llmslim serve` serves it (`--enable-lora --lora-modules eora=OUT/eora`). The adapter is
attached by wrapping the worker's engine factory in this file's `--worker` mode; nothing else differs.

Where vLLM cannot serve the export (on a CPU: a head_dim outside its attention set, or a weight-only
export whose kernel this build lacks) each entry says why instead of giving numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def worker(job_path: str, out_path: str) -> int:
    """llmslim's throughput worker; with the job's "lora", every request goes through the adapter."""
    from llmslim.evaluate import worker as w

    job = json.loads(Path(job_path).read_text())
    lora = job.pop("lora", None)
    if lora:
        make = w._vllm_engine

        def engine(job: dict) -> Any:
            import vllm
            from vllm.lora.request import LoRARequest

            plain = vllm.LLM
            vllm.LLM = functools.partial(plain, enable_lora=True, max_lora_rank=lora["rank"], max_loras=1)
            try:
                llm = make(job)  # it imports LLM from vllm when called: the partial above
            finally:
                vllm.LLM = plain
            request = LoRARequest("eora", 1, lora["path"])
            llm.llm_engine.add_request = functools.partial(llm.llm_engine.add_request, lora_request=request)
            return llm

        w._vllm_engine = engine
    Path(job_path).write_text(json.dumps(job))
    sys.argv = [sys.argv[0], job_path, out_path]
    return w.main()


def measure(export: Path, batch_sizes: tuple[int, ...], log_dir: Path | None = None) -> dict[str, Any]:
    """{"base": entry, "base + eora": entry}, each as llmslim.evaluate.throughput.summarize gives it."""
    from llmslim.evaluate.throughput import ThroughputSettings, cannot_run, gpu_available, make_job, summarize
    from llmslim.formats.lora import adapter_dir, max_rank

    adapter = adapter_dir(export)
    if adapter is None:
        raise SystemExit(f"{export}: no eora/ adapter in this export")
    settings = ThroughputSettings(batch_sizes=batch_sizes)
    gpu = gpu_available()
    out: dict[str, Any] = {"settings": settings.as_dict(), "adapter": str(adapter), "rank": max_rank(adapter)}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    for variant in ("base", "base + eora"):
        why = cannot_run(export, "vllm", settings, gpu)
        if why:
            out[variant] = {"ok": False, "error": why}
            continue
        job = make_job(export, "vllm", settings, gpu)
        if variant != "base":
            job["lora"] = {"path": str(adapter), "rank": out["rank"]}
        with tempfile.TemporaryDirectory(prefix="eora-tput-") as tmp:
            job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
            job_path.write_text(json.dumps(job))
            log = (log_dir / f"throughput-{'eora' if job.get('lora') else 'base'}.log") if log_dir else None
            if log:
                log.parent.mkdir(parents=True, exist_ok=True)
            with (log.open("w") if log else open(os.devnull, "w")) as sink:
                try:
                    subprocess.run([sys.executable, __file__, "--worker", str(job_path), str(result_path)], env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, timeout=settings.timeout_s,
                                   start_new_session=True)
                except subprocess.TimeoutExpired:
                    out[variant] = {"ok": False, "error": f"timed out after {settings.timeout_s:.0f} s"}
                    continue
            raw = json.loads(result_path.read_text()) if result_path.is_file() else {
                "ok": False, "error": f"the worker wrote no result (log: {log})"}
        out[variant] = summarize(raw, settings)
    return out


def decode_rows(result: dict[str, Any]) -> list[list[str]]:
    """[batch size, base decode tok/s, with the adapter, ratio] per batch size (or the reason per variant)."""
    base, lora = result.get("base") or {}, result.get("base + eora") or {}
    if not (base.get("ok") and lora.get("ok")):
        return [["-", base.get("error") or "ok", lora.get("error") or "ok", "-"]]
    rows = []
    for b, e in zip(base["batches"], lora["batches"]):
        x, y = b["decode_tok_s"]["median"], e["decode_tok_s"]["median"]
        rows.append([str(b["batch_size"]), f"{x:.1f}", f"{y:.1f}", f"{y / x:.2f}" if x else "-"])
    return rows


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", type=Path, required=True, help="an llmslim export with an eora/ adapter")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--logs", type=Path, help="the workers' logs go here")
    args = p.parse_args()
    result = measure(args.export, tuple(int(x) for x in args.batch_sizes.split(",")), args.logs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for row in decode_rows(result):
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
