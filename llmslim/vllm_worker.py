"""Runs vLLM in its own process: `python -m llmslim.vllm_worker JOBS.json RESULT.json`.

vLLM's engine spawns processes and keeps global state, so llmslim never imports it in the calling
process. Each job loads one model, greedily generates from token-id prompts and records the tokens (or
the error). The parent reads RESULT.json; a crash of this process is reported by the parent."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    lora: dict = {}
    request = None
    if job.get("lora"):  # a LoRA adapter (eora/, qat/) served over the base, as `--enable-lora --lora-modules` does
        from vllm.lora.request import LoRARequest

        lora = dict(enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=1)
        request = LoRARequest(os.path.basename(job["lora"].rstrip("/")), 1, job["lora"])
    llm = LLM(model=job["model"], dtype=job.get("dtype", "auto"), skip_tokenizer_init=True,
              gpu_memory_utilization=job.get("gpu_memory_utilization", 0.3), enforce_eager=True,
              max_model_len=job["max_model_len"], max_num_seqs=max(8, len(job["prompts"])), seed=0,
              distributed_executor_backend="uni", **lora)  # one process: see check.run_vllm_jobs
    result: dict = {"load_seconds": time.perf_counter() - started, "loaded": True}
    if job.get("generate", True):
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
        try:
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False,
                                lora_request=request)
            result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        except Exception as e:  # e.g. a kernel this CPU build lacks: reported, not fatal to other jobs
            result["generate_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    del llm
    gc.collect()
    return result


def main() -> int:
    jobs_path, out_path = sys.argv[1], sys.argv[2]
    jobs = json.loads(open(jobs_path).read())
    results = []
    for job in jobs:
        try:
            results.append(run_job(job))
        except Exception as e:
            results.append({"loaded": False, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc(limit=8)})
        with open(out_path + ".tmp", "w") as f:  # partial results survive a later crash
            json.dump(results, f)
        os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
