"""Export checks: does the exported directory load, and do vLLM and transformers agree on it?

Both sides greedily generate the same number of tokens from the same token-id prompts (EOS does not
stop either side) and every token must match. vLLM runs in a child process (see vllm_worker).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from . import cpu
from .cpu import NEAR_TIE, VllmRun, export_kind, head_dim_problem, vllm_cpu_run, vllm_gpu_run
from .errors import UserError
from .formats.lora import adapter_dir, max_rank
from .loading import load_tokenizer
from .serve import head_dim

log = logging.getLogger(__name__)

PROMPTS = ["Once upon a time", "The little dog", "She opened the box and", "In the morning, the"]
MAX_NEW_TOKENS = 32


class CheckError(UserError):
    """The export does not behave: the message says where the two sides differ."""


@dataclass
class CheckResult:
    backend: str
    passed: bool
    prompts: int = 0
    tokens_per_prompt: int = MAX_NEW_TOKENS
    generated: bool = True  # vLLM generated here and its tokens were judged (False: this CPU cannot; see detail)
    detail: str = ""
    tokens: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("tokens")
        return d


def prompt_ids(tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """Token ids of the fixed prompts from the model's tokenizer; fixed ids when it has none."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(1234)
        return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in (4, 6, 8, 5)]
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def tokenizer_problem(model_dir: str | Path, tokenizer: Any) -> str | None:
    """Why the directory's tokenizer cannot belong to its model (None when nothing is wrong): ids beyond
    the embedding (vocab_size), or a BOS token that config.json names differently (a swapped tokenizer)."""
    if tokenizer is None:
        return None
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config") or cfg
    vocab = cfg.get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        return (f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: "
                "the tokenizer does not belong to this model")
    bos = cfg.get("bos_token_id")
    if isinstance(bos, int) and tokenizer.bos_token_id is not None and tokenizer.bos_token_id != bos:
        return (f"{model_dir}: the tokenizer's BOS token is id {tokenizer.bos_token_id} ({tokenizer.bos_token!r}) "
                f"but config.json says bos_token_id {bos}: the tokenizer does not belong to this model")
    if not all(tokenizer(p)["input_ids"] for p in PROMPTS):
        return f"{model_dir}: the tokenizer gives no tokens for the check's prompts"
    return None


@torch.no_grad()
def greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Greedy continuation of each prompt with a KV cache; EOS does not stop it (vLLM runs ignore_eos)."""
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        res = model(input_ids=ids, use_cache=True)
        tokens = []
        for _ in range(max_new_tokens):
            nxt = int(res.logits[0, -1].float().argmax())
            tokens.append(nxt)
            res = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=res.past_key_values,
                        use_cache=True)
        out.append(tokens)
    return out


def _first_difference(a: list[list[int]], b: list[list[int]]) -> str | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            j = next((k for k, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            return f"prompt {i} differs at generated token {j}: {x[max(0, j - 2): j + 4]} vs {y[max(0, j - 2): j + 4]}"
    return None


def load_for_check(model_dir: str | Path) -> torch.nn.Module:
    """The export as transformers loads it, in float32 (quantized weights decompressed to dense)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _quantization(model_dir: str | Path) -> dict | None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("quantization_config")


def _weight_bits(q: dict) -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of a compressed-tensors config's first scheme."""
    for group in (q.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        a = group.get("input_activations") or {}
        return w.get("num_bits"), a.get("num_bits")
    return None, None


def vllm_run_for(model_dir: str | Path) -> VllmRun:
    """How vLLM must run this export here (dtype, whether it can generate, how tokens are judged): the
    decision tables of llmslim.cpu applied to this machine."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    kind, declared = export_kind(cfg), str(cfg.get("dtype", cfg.get("torch_dtype")))
    if torch.cuda.is_available():
        return vllm_gpu_run(kind, declared)
    return vllm_cpu_run(kind, cpu.detect(), declared)




@torch.no_grad()
def near_tie_violations(model: torch.nn.Module, prompts: list[list[int]], tokens: list[list[int]],
                        tolerance: float = NEAR_TIE) -> tuple[list[str], float, int]:
    """Teacher-force each prompt + vLLM's tokens through `model` (float32) and list every step where
    vLLM's token is not the argmax and not within `tolerance` x the largest |logit| of it. Returns (violations,
    the largest gap seen as a fraction of its step's largest |logit|, the unit of `tolerance`; how many steps
    were the exact argmax)."""
    device = next(model.parameters()).device
    bad, worst, exact = [], 0.0, 0
    for i, (p, t) in enumerate(zip(prompts, tokens)):
        logits = model(input_ids=torch.tensor([p + t], device=device)).logits[0, len(p) - 1: -1].float()  # [T, V]
        top = logits.max(dim=-1).values
        chosen = logits.gather(1, torch.tensor(t, device=device)[:, None])[:, 0]
        gap = top - chosen
        tol = tolerance * logits.abs().max(dim=-1).values
        exact += int((gap == 0).sum())
        worst = max(worst, float((gap / logits.abs().max(dim=-1).values).max()))
        for j in (gap > tol).nonzero().flatten().tolist():
            bad.append(f"prompt {i} token {j}: vLLM chose {t[j]}, {float(gap[j]):.4f} below the argmax "
                       f"{int(logits[j].argmax())} (tolerance {float(tol[j]):.4f})")
    return bad, worst, exact


def _quantized_modules(model_dir: str | Path) -> set[str]:
    """Names of the Linears stored quantized in a compressed-tensors export (they have a weight_scale)."""
    from .checkpoint import Checkpoint

    return {n[: -len(".weight_scale")] for n in Checkpoint(model_dir).names if n.endswith(".weight_scale")}


def transformers_model(model_dir: str | Path) -> torch.nn.Module:
    """The export in transformers (float32), with its LoRA adapter (eora/, qat/) applied by peft; W8A8 exports get vLLM's dynamic per-token int8 activation
    quantization emulated so both sides compute the same thing."""
    lora = adapter_dir(model_dir)
    if lora is None:
        model = load_for_check(model_dir)
    else:  # its adapter (eora's, qat's), applied by peft over the dequantized base, as users of transformers would
        from peft import PeftModel
        from transformers import CompressedTensorsConfig

        dense = {} if _quantization(model_dir) is None else {  # a dense base (qat base nf4 alone) loads as it is
            "quantization_config": CompressedTensorsConfig(run_compressed=False)}  # dense Linears for peft
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **dense)
        model = PeftModel.from_pretrained(base.eval(), str(lora)).eval()
    q = _quantization(model_dir)
    if q is not None and _weight_bits(q)[1] == 8:
        from .formats.compressed import emulate_activation_quant

        emulate_activation_quant(model, bits=8)
    return model


def _max_len(model_dir: str | Path, prompts: list[list[int]]) -> int:
    cfg = AutoConfig.from_pretrained(model_dir)
    need = max(len(p) for p in prompts) + MAX_NEW_TOKENS + 8
    return min(cfg.max_position_embeddings, max(need, 128))


def run_vllm_jobs(jobs: list[dict], timeout: float | None = 900) -> list[dict]:
    """Run several vLLM jobs in one child process (one Python start-up for all of them); timeout None: no limit."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The child already isolates vLLM: run its engine core and worker in that process instead of two more
    # (each re-imports vLLM and torch: ~16 s of a ~17 s engine start here). Checking tokens, not speed.
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with tempfile.TemporaryDirectory(prefix="llmslim-vllm-") as tmp:
        jobs_path, out_path = Path(tmp) / "jobs.json", Path(tmp) / "result.json"
        jobs_path.write_text(json.dumps(jobs))
        proc = subprocess.run([sys.executable, "-m", "llmslim.vllm_worker", str(jobs_path), str(out_path)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        results = json.loads(out_path.read_text()) if out_path.exists() else []
        if len(results) < len(jobs):
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            missing = [{"loaded": False, "error": f"vLLM worker exited with code {proc.returncode}: "
                        + " | ".join(tail)} for _ in jobs[len(results):]]
            results += missing
        return results


def _fail(backend: str, detail: str, tokens: list[list[int]] | None = None) -> CheckResult:
    return CheckResult(backend, False, detail=detail, tokens=tokens or [])


def check_exports(model_dirs: list[str | Path], backend: str = "vllm",
                  references: list[torch.nn.Module | None] | None = None) -> list[CheckResult]:
    """Check several exports; vLLM loads them one after another in a single child process.

    transformers: each loads and generates (with its LoRA adapter, eora/ or qat/, applied by peft), its tokenizer fits it, and (with a reference, the model before
    export) it gives the same greedy tokens as that model. vllm: additionally vLLM serves it, in the dtype
    this machine's kernels need (llmslim.cpu), with transformers' greedy tokens: exactly where vLLM runs in
    float32, up to near-ties (llmslim.cpu's NEAR_TIE*) where it must run in 16 bits. Results say what failed; nothing is
    raised for a failing model."""
    dirs = [Path(d) for d in model_dirs]
    references = references or [None] * len(dirs)
    results: list[CheckResult | None] = [None] * len(dirs)
    jobs, waiting = [], []
    for k, (d, reference) in enumerate(zip(dirs, references)):
        cfg = AutoConfig.from_pretrained(d)
        try:
            tokenizer = load_tokenizer(d)
            problem = tokenizer_problem(d, tokenizer)
        except UserError as e:
            problem = str(e)
        if problem:
            results[k] = _fail(backend, problem)
            continue
        prompts = prompt_ids(tokenizer, cfg.vocab_size)
        model = transformers_model(d)
        hf = greedy(model, prompts)
        if reference is not None:
            q = _quantization(d)
            if q is not None and _weight_bits(q)[1] == 8:  # compare like with like: vLLM's int8 activations
                from .formats.compressed import emulate_activation_quant

                emulate_activation_quant(reference, bits=8, only=_quantized_modules(d))
            diff = _first_difference(greedy(reference, prompts), hf)
            if diff:
                results[k] = _fail(backend, f"{d}: the export reloaded in transformers differs from the model "
                                            f"before export: {diff}")
                continue
        if backend == "transformers":
            results[k] = CheckResult("transformers", True, len(prompts), tokens=hf, detail="loads in transformers"
                                     + ("; same greedy tokens as before export" if reference is not None else ""))
            continue
        if not torch.cuda.is_available() and (problem := head_dim_problem(head_dim(cfg.to_dict()))):
            results[k] = _fail("vllm", f"{d}: {problem}; use export.check: transformers")
            continue
        plan = vllm_run_for(d)
        lora = adapter_dir(d)
        jobs.append(dict(model=str(d), dtype=plan.dtype, prompts=prompts, max_tokens=MAX_NEW_TOKENS,
                         max_model_len=_max_len(d, prompts), generate=plan.generates,
                         **({"lora": str(lora), "max_lora_rank": max_rank(lora)} if lora is not None else {})))
        waiting.append((k, hf, plan, None if plan.exact else model))  # near-ties are judged on it later
        del model
    for job, (k, hf, plan, kept), res in zip(jobs, waiting, run_vllm_jobs(jobs) if jobs else []):
        results[k] = _vllm_result(dirs[k], job, plan, hf, kept, res)
    return [r for r in results if r is not None]


def _vllm_result(d: Path, job: dict, plan: VllmRun, hf: list[list[int]], model: torch.nn.Module | None,
                 res: dict) -> CheckResult:
    n = len(hf)
    if not res.get("loaded"):
        return _fail("vllm", f"{d}: vLLM could not load the export: {res.get('error')}", hf)
    if not plan.generates:
        return CheckResult("vllm", True, n, generated=False, tokens=hf,
                           detail=f"vLLM loads the export; generation not possible here: {plan.why}")
    if "generate_error" in res:
        return _fail("vllm", f"{d}: vLLM ({job['dtype']}) loaded the export but generation failed: "
                             f"{res['generate_error']}", hf)
    if not plan.faithful:
        return CheckResult("vllm", True, n, generated=False, tokens=hf, detail=(
            f"vLLM loads the export and generates with it; its tokens cannot be compared here: {plan.why}"))
    if plan.exact:
        if diff := _first_difference(hf, res["tokens"]):
            return _fail("vllm", f"{d}: vLLM and transformers disagree: {diff} (transformers vs vLLM)", hf)
        return CheckResult("vllm", True, n, tokens=hf,
                           detail=f"vLLM and transformers agree on {n} x {MAX_NEW_TOKENS} greedy tokens")
    assert model is not None
    return _near_tie_result(d, job, plan, model, hf, res["tokens"])


def _near_tie_result(d: Path, job: dict, plan: VllmRun, model: torch.nn.Module, hf: list[list[int]],
                     tokens: list[list[int]]) -> CheckResult:
    """A 16-bit vLLM run judged against transformers in float32 (see near_tie_violations)."""
    n = len(tokens)
    bad, worst, exact = near_tie_violations(model, job["prompts"], tokens, plan.near_tie)
    if bad:
        return _fail("vllm", f"{d}: vLLM ({job['dtype']}) disagrees with transformers (float32): {bad[0]}"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""), hf)
    return CheckResult("vllm", True, n, tokens=tokens, detail=(
        f"vLLM ({job['dtype']} activations: {plan.why}) agrees with transformers (float32) "
        f"on {n} x {MAX_NEW_TOKENS} greedy tokens: {exact} are the float32 argmax, the rest near-ties "
        f"(largest gap {worst:.4f} of its step's largest |logit|, tolerance {plan.near_tie:g})"))


def check_export(model_dir: str | Path, backend: str = "vllm", *, reference: torch.nn.Module | None = None) -> CheckResult:
    """Check one export (see check_exports); raises CheckError when it fails."""
    result = check_exports([model_dir], backend, [reference])[0]
    if not result.passed:
        raise CheckError(result.detail)
    return result
