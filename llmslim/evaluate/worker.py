"""The throughput benchmark's child process: `python -m llmslim.evaluate.worker JOB.json RESULT.json`.

One process serves one model with one backend, so that its peak memory is that model's alone and vLLM
(which spawns processes and keeps global state) never runs in the caller. The job gives the batch sizes,
prompt and generation lengths, warm-up runs and repeats; the result holds the raw timings of every timed
run (token delivery times per request) and the memory peaks; `throughput.summarize` turns them into the
report's statistics. Progress goes to stderr as `@@llmslim {json}` lines for the parent's display.

Each run submits `batch_size` requests of `prompt_len` random token ids at once and generates exactly
`gen_len` tokens for each (greedy, EOS ignored). Times are taken where a client would see them: when the
engine hands a request's new tokens back (vLLM's LLMEngine.step with delta outputs; after each forward
pass and a device synchronisation in transformers).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

import psutil

PROGRESS_PREFIX = "@@llmslim "


def progress(**event: Any) -> None:
    sys.stderr.write(PROGRESS_PREFIX + json.dumps(event) + "\n")
    sys.stderr.flush()


def random_prompts(vocab_size: int, avoid: list[int], batch_size: int, prompt_len: int, seed: int) -> list[list[int]]:
    """`batch_size` prompts of `prompt_len` token ids drawn uniformly from the vocabulary minus `avoid`
    (special tokens), as vLLM's random dataset does. The same arguments give the same prompts for every
    model, so models with one vocabulary are measured on identical input."""
    import random

    rng = random.Random(seed)
    skip = set(avoid)
    allowed = [i for i in range(vocab_size) if i not in skip]
    return [[rng.choice(allowed) for _ in range(prompt_len)] for _ in range(batch_size)]


def run_seed(seed: int, batch_size: int, repeat: int) -> int:
    """The prompt seed of one run: different for every run, so no run can reuse another's prefix cache."""
    return seed * 1_000_003 + batch_size * 1009 + repeat


class TreeMemory:
    """Peak resident memory of this process and all its children (vLLM's engine runs in children),
    sampled every `interval` s; and, on a GPU with NVML, the device memory in use."""

    def __init__(self, interval: float = 0.05, gpu_index: int | None = None):
        self.interval = interval
        self.peak = self.device_peak = 0
        self._nvml: Any = None
        if gpu_index is not None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
            except Exception:  # no NVML: device memory is then reported by torch where it can be
                self._nvml = None
        self.device_start = self.device_used() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # a child that just exited
                pass
        return total

    def device_used(self) -> int | None:
        if self._nvml is None:
            return None
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        self.peak = max(self.peak, self.rss())
        used = self.device_used()
        if used is not None:
            self.device_peak = max(self.device_peak, used - self.device_start)

    def start(self) -> TreeMemory:
        self.peak = self.rss()
        self._thread.start()
        return self

    def take(self) -> tuple[int, int | None]:
        """(peak RSS, peak device bytes) since the last take, then start a new window."""
        self.sample()
        out = (self.peak, self.device_peak if self._nvml is not None else None)
        self.peak, self.device_peak = self.rss(), 0
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _record(events: dict[str, list[tuple[float, int]]], t0: float, t_end: float) -> dict[str, Any]:
    """Raw timings of one run: per request, the delivery times (s after submission) and token counts."""
    return {"e2e_s": t_end - t0,
            "requests": [{"times": [t - t0 for t, _ in ev], "tokens": [n for _, n in ev]} for ev in events.values()]}


# ---------------------------------------------------------------- vLLM


def _vllm_engine(job: dict) -> Any:
    from vllm import LLM

    v = job.get("vllm", {})
    # with a draft model: vLLM's speculative decoding, and its statistics on (the spec-decode counters)
    spec = dict(speculative_config=job["speculative"], disable_log_stats=False) if job.get("speculative") else {}
    return LLM(model=job["model"], dtype=job.get("dtype", "auto"), skip_tokenizer_init=True, seed=0,
               gpu_memory_utilization=v.get("gpu_memory_utilization", 0.3), enforce_eager=v.get("enforce_eager", True),
               max_model_len=job["prompt_len"] + job["gen_len"], max_num_seqs=max(job["batch_sizes"]),
               enable_prefix_caching=False, trust_remote_code=job.get("trust_remote_code", False), **spec)


SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}


def spec_counters(llm: Any) -> dict[str, int]:
    """vLLM's cumulative spec-decode counters (LLM.get_metrics, summed over engines): drafts (target steps
    that verified a proposal), draft tokens proposed, draft tokens accepted."""
    out = dict.fromkeys(SPEC_COUNTERS.values(), 0)
    for metric in llm.get_metrics():
        key = SPEC_COUNTERS.get(metric.name)
        if key is not None and isinstance(getattr(metric, "value", None), (int, float)):
            out[key] += int(metric.value)
    return out


def _kv_cache(llm: Any) -> dict[str, Any]:
    """The KV-cache capacity the engine resolved at start-up. The engine core (another process) profiles
    memory and sends the block count back to this front end's cache_config; its own token and concurrency
    figures stay in that process, so they are recomputed here the way vLLM computes them."""
    engine = llm.llm_engine
    cc = engine.vllm_config.cache_config
    max_len = int(engine.vllm_config.model_config.max_model_len)
    blocks, block = getattr(cc, "num_gpu_blocks", None), getattr(cc, "block_size", None)
    per_request = -(-max_len // block) if block else None  # blocks one request of max_model_len needs
    return {"blocks": blocks, "block_size": block, "tokens": blocks * block if blocks and block else None,
            "max_model_len": max_len,
            "max_concurrency": blocks // per_request if blocks and per_request else None,
            "cache_dtype": str(getattr(cc, "cache_dtype", "auto"))}


def _vllm_run(llm: Any, prompts: list[list[int]], gen_len: int, tag: str) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    spec = engine.vllm_config.speculative_config is not None
    before = spec_counters(llm) if spec else None
    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    events: dict[str, list[tuple[float, int]]] = {f"{tag}-{i}": [] for i in range(len(prompts))}
    tokens: dict[str, list[int]] = {rid: [] for rid in events}
    t0 = time.perf_counter()
    for rid, p in zip(events, prompts):
        engine.add_request(rid, TokensPrompt(prompt_token_ids=p), params)
    while engine.has_unfinished_requests():
        outs = engine.step()
        t = time.perf_counter()
        for o in outs:
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            if n and o.request_id in events:
                events[o.request_id].append((t, n))
                tokens[o.request_id] += list(o.outputs[0].token_ids)
    run = _record(events, t0, time.perf_counter())
    # the generated ids, hashed: greedy runs of one model on the same prompts must agree with and without a draft
    run["tokens_sha256"] = hashlib.sha256(json.dumps(list(tokens.values())).encode()).hexdigest()
    if before is not None:  # this run's share of the counters
        after = spec_counters(llm)
        run["spec"] = {k: after[k] - before[k] for k in after}
    return run


# ---------------------------------------------------------------- transformers


def _hf_model(job: dict) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = job.get("dtype", "auto")
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                                 trust_remote_code=job.get("trust_remote_code", False))
    return model.to(job.get("device", "cpu")).eval()


def _hf_run(model: Any, prompts: list[list[int]], gen_len: int) -> dict[str, Any]:
    """Greedy generation with a KV cache, one forward pass per token for the whole batch."""
    import torch

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.tensor(prompts, device=device)  # [B, P]: equal lengths, so no padding or mask
    times: list[float] = []
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        sync()
        times.append(time.perf_counter())
        for _ in range(gen_len - 1):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            times.append(time.perf_counter())
    events = {str(i): [(t, 1) for t in times] for i in range(len(prompts))}
    return _record(events, t0, times[-1])


# ---------------------------------------------------------------- the job


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def _dtype(engine: Any, backend: str) -> str:
    """The dtype the backend computes in (vLLM's "auto" turns float32 checkpoints into 16-bit)."""
    dtype = engine.llm_engine.model_config.dtype if backend == "vllm" else next(engine.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def _nvml_index() -> int:
    """NVML's index of the device vLLM uses: the first of CUDA_VISIBLE_DEVICES (NVML ignores that variable)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def run_job(job: dict) -> dict[str, Any]:
    backend = job["backend"]
    gpu = job.get("device", "cpu").startswith("cuda")
    import torch  # the runtime counts as the base, not as the model's memory

    if backend == "vllm":
        import vllm  # noqa: F401
    mem = TreeMemory(gpu_index=_nvml_index() if gpu and backend == "vllm" else None).start()
    # The 1-minute load average, sampled around each batch size: other work on the machine is the main
    # source of noise in these timings, and the report shows it next to them.
    result: dict[str, Any] = {"ok": True, "base_rss_bytes": mem.rss(), "batches": [], "load_avg": [_load()]}
    started = time.perf_counter()
    engine = _vllm_engine(job) if backend == "vllm" else _hf_model(job)
    result["load_seconds"] = time.perf_counter() - started
    result["kv_cache"] = _kv_cache(engine) if backend == "vllm" else None
    result["dtype"] = _dtype(engine, backend)
    result["load_peak_rss_bytes"], result["load_peak_device_bytes"] = mem.take()
    progress(event="loaded", seconds=result["load_seconds"])
    torch_cuda = torch.cuda if gpu and backend == "transformers" else None
    for bs in job["batch_sizes"]:
        if torch_cuda is not None:
            torch_cuda.reset_peak_memory_stats()
        runs = []
        for rep in range(job["warmup"] + job["repeats"]):
            prompts = random_prompts(job["vocab_size"], job.get("avoid_ids", []), bs, job["prompt_len"],
                                     run_seed(job.get("seed", 0), bs, rep))
            if backend == "vllm":
                run = _vllm_run(engine, prompts, job["gen_len"], f"b{bs}r{rep}")
            else:
                run = _hf_run(engine, prompts, job["gen_len"])
            if rep >= job["warmup"]:
                runs.append(run)
            progress(event="run", batch_size=bs, repeat=rep, warmup=rep < job["warmup"])
        peak, device_peak = mem.take()
        if torch_cuda is not None:
            device_peak = int(torch_cuda.max_memory_allocated())
        result["batches"].append({"batch_size": bs, "runs": runs, "peak_rss_bytes": peak,
                                  "peak_device_bytes": device_peak})
        result["load_avg"].append(_load())
    mem.stop()
    del engine
    gc.collect()
    return result


def main() -> int:
    job_path, out_path = sys.argv[1], sys.argv[2]
    with open(job_path) as f:
        job = json.load(f)
    try:
        result = run_job(job)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result = {"ok": False, "error": f"{type(e).__name__}: {first}", "traceback": traceback.format_exc(limit=12)}
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
