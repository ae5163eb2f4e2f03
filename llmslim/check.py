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

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import UserError

log = logging.getLogger(__name__)

PROMPTS = ["Once upon a time", "The little dog", "She opened the box and", "In the morning, the"]
MAX_NEW_TOKENS = 32
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class CheckError(UserError):
    """The export does not behave: the message says where the two sides differ."""


@dataclass
class CheckResult:
    backend: str
    passed: bool
    prompts: int = 0
    tokens_per_prompt: int = MAX_NEW_TOKENS
    generated: bool = True  # False when the engine loaded but this machine cannot run the format
    detail: str = ""
    tokens: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("tokens")
        return d


def prompt_ids(model_dir: str | Path, vocab_size: int) -> list[list[int]]:
    """Token ids of the fixed prompts: from the model's tokenizer, or fixed ids when it has none."""
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = [tok(p)["input_ids"] for p in PROMPTS]
        if all(ids) and max(max(i) for i in ids) < vocab_size:
            return ids
    except Exception:  # no tokenizer files: tiny test models; fall through to fixed ids
        pass
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in (4, 6, 8, 5)]


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


def vllm_activation_dtype(model_dir: str | Path) -> str:
    """The dtype vLLM must run an export in: weight-only quantized formats (W4A16, W8A16) have kernels for
    16-bit activations only (CPU: cpu_gemm_wna16; GPU: Marlin/Machete), everything else runs in float32."""
    q = _quantization(model_dir)
    if q is None or _weight_bits(q)[1] is not None:
        return "float32"
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return "float16" if cfg.get("dtype", cfg.get("torch_dtype")) == "float16" else "bfloat16"


def cpu_can_run(model_dir: str | Path) -> tuple[bool, str]:
    """Whether vLLM's CPU build can generate with this export on this machine, and why not."""
    q = _quantization(model_dir)
    if q is None:
        return True, ""
    wbits, abits = _weight_bits(q)
    # vLLM loads its AVX-512 kernel library when torch reports AVX-512 (vllm/platforms/cpu.py); only
    # that library has the weight-only kernel.
    if abits is None and not torch.cpu._is_avx512_supported():
        return False, (f"W{wbits}A16 loads in vLLM, but its CPU kernel (cpu_gemm_wna16) exists only in the "
                       "AVX-512 build and this CPU has AVX2 only: generation needs a GPU or an AVX-512 CPU")
    return True, ""


# In 16-bit runs, greedy decoding may take either side of a near-tie: vLLM's token then has to be within
# this fraction of the largest |logit| of the float32 argmax (bf16 keeps 8 significant bits: 2^-8 per
# rounding, a few roundings deep).
NEAR_TIE = 2**-5


@torch.no_grad()
def near_tie_violations(model: torch.nn.Module, prompts: list[list[int]], tokens: list[list[int]]
                        ) -> tuple[list[str], float, int]:
    """Teacher-force each prompt + vLLM's tokens through `model` (float32) and list every step where
    vLLM's token is not the argmax and not within NEAR_TIE of it. Returns (violations, the largest logit
    gap seen, how many steps were the exact argmax)."""
    device = next(model.parameters()).device
    bad, worst, exact = [], 0.0, 0
    for i, (p, t) in enumerate(zip(prompts, tokens)):
        logits = model(input_ids=torch.tensor([p + t], device=device)).logits[0, len(p) - 1: -1].float()  # [T, V]
        top = logits.max(dim=-1).values
        chosen = logits.gather(1, torch.tensor(t, device=device)[:, None])[:, 0]
        gap = top - chosen
        tol = NEAR_TIE * logits.abs().max(dim=-1).values
        exact += int((gap == 0).sum())
        worst = max(worst, float(gap.max()))
        for j in (gap > tol).nonzero().flatten().tolist():
            bad.append(f"prompt {i} token {j}: vLLM chose {t[j]}, {float(gap[j]):.4f} below the argmax "
                       f"{int(logits[j].argmax())} (tolerance {float(tol[j]):.4f})")
    return bad, worst, exact


def _quantized_modules(model_dir: str | Path) -> set[str]:
    """Names of the Linears stored quantized in a compressed-tensors export (they have a weight_scale)."""
    from .checkpoint import Checkpoint

    return {n[: -len(".weight_scale")] for n in Checkpoint(model_dir).names if n.endswith(".weight_scale")}


def transformers_tokens(model_dir: str | Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens from transformers; W8A8 exports get vLLM's dynamic per-token int8 activation
    quantization emulated so both sides compute the same thing."""
    model = load_for_check(model_dir)
    q = _quantization(model_dir)
    if q is not None:
        _, abits = _weight_bits(q)
        if abits == 8:
            from .formats.compressed import emulate_activation_quant

            emulate_activation_quant(model, bits=8)
    return greedy(model, prompts)


def _max_len(model_dir: str | Path, prompts: list[list[int]]) -> int:
    cfg = AutoConfig.from_pretrained(model_dir)
    need = max(len(p) for p in prompts) + MAX_NEW_TOKENS + 8
    return min(cfg.max_position_embeddings, max(need, 128))


def run_vllm_jobs(jobs: list[dict], timeout: float = 900) -> list[dict]:
    """Run several vLLM jobs in one child process (one Python start-up for all of them)."""
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

    transformers: each loads and generates, and (with a reference, the model before export) gives the
    same greedy tokens as that model. vllm: additionally vLLM serves it with exactly transformers'
    greedy tokens. Results say what failed; nothing is raised for a failing model."""
    dirs = [Path(d) for d in model_dirs]
    references = references or [None] * len(dirs)
    results: list[CheckResult | None] = [None] * len(dirs)
    jobs, waiting = [], []
    for k, (d, reference) in enumerate(zip(dirs, references)):
        cfg = AutoConfig.from_pretrained(d)
        prompts = prompt_ids(d, cfg.vocab_size)
        hf = transformers_tokens(d, prompts)
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
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if not torch.cuda.is_available() and head_dim not in VLLM_CPU_HEAD_DIMS:
            results[k] = _fail("vllm", f"{d}: head_dim {head_dim} is not supported by vLLM's CPU attention "
                                       f"(supported: {', '.join(map(str, VLLM_CPU_HEAD_DIMS))}); use export.check: "
                                       "transformers")
            continue
        can_run, why = cpu_can_run(d) if not torch.cuda.is_available() else (True, "")
        jobs.append(dict(model=str(d), dtype=vllm_activation_dtype(d), prompts=prompts, max_tokens=MAX_NEW_TOKENS,
                         max_model_len=_max_len(d, prompts), generate=can_run))
        waiting.append((k, hf, why))
    for job, (k, hf, why), res in zip(jobs, waiting, run_vllm_jobs(jobs) if jobs else []):
        d, n = dirs[k], len(hf)
        if job["dtype"] != "float32" and res.get("loaded") and not why and "tokens" in res:
            results[k] = _near_tie_result(d, job, hf, res["tokens"])
            continue
        if not res.get("loaded"):
            results[k] = _fail("vllm", f"{d}: vLLM could not load the export: {res.get('error')}", hf)
        elif why:
            results[k] = CheckResult("vllm", True, n, generated=False, tokens=hf,
                                     detail=f"vLLM loads the export; generation not possible here: {why}")
        elif "generate_error" in res:
            results[k] = _fail("vllm", f"{d}: vLLM loaded the export but generation failed: {res['generate_error']}", hf)
        elif diff := _first_difference(hf, res["tokens"]):
            results[k] = _fail("vllm", f"{d}: vLLM and transformers disagree: {diff} (transformers vs vLLM)", hf)
        else:
            results[k] = CheckResult("vllm", True, n, tokens=hf,
                                     detail=f"vLLM and transformers agree on {n} x {MAX_NEW_TOKENS} greedy tokens")
    return [r for r in results if r is not None]


def _near_tie_result(d: Path, job: dict, hf: list[list[int]], tokens: list[list[int]]) -> CheckResult:
    """A 16-bit vLLM run judged against transformers in float32 (see near_tie_violations)."""
    n = len(tokens)
    bad, worst, exact = near_tie_violations(load_for_check(d), job["prompts"], tokens)
    if bad:
        return _fail("vllm", f"{d}: vLLM ({job['dtype']}) disagrees with transformers (float32): {bad[0]}"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""), hf)
    return CheckResult("vllm", True, n, tokens=tokens, detail=(
        f"vLLM ({job['dtype']} activations, as its weight-only kernels need) agrees with transformers (float32) "
        f"on {n} x {MAX_NEW_TOKENS} greedy tokens: {exact} are the float32 argmax, the rest near-ties "
        f"(largest logit gap {worst:.4f})"))


def check_export(model_dir: str | Path, backend: str = "vllm", *, reference: torch.nn.Module | None = None) -> CheckResult:
    """Check one export (see check_exports); raises CheckError when it fails."""
    result = check_exports([model_dir], backend, [reference])[0]
    if not result.passed:
        raise CheckError(result.detail)
    return result
