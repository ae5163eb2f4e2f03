"""qat: quantization-aware training that ends on exactly the grid the export serves.

base: grid (default). Every targeted Linear (gptq's targets and `ignore` rules) starts at W0 on the export
grid: `init: rtn` (round to nearest) or `init: gptq` (GPTQ on calibration data, layer by layer), which also
give the scales and zero points. LoRA adapters (peft) train and every forward uses Q(W0 + (alpha/r) B A)
(llmslim.training.fakequant, straight-through gradients; `learn_scales` trains the scales too, LSQ-style).
The export is the integers Q produces for the final weights: the stage writes compressed-tensors like
gptq, and the model transformers or vLLM loads computes what the trained model computed. `merge: false`
keeps the adapters apart instead: W0's integers stay frozen, every forward uses Q(W0) x + (alpha/r) B A x,
and the export is those integers (compressed-tensors) plus the adapters as a PEFT LoRA adapter in `qat/`
(formats/lora.py), which transformers+peft and vLLM (`--enable-lora`) apply as training did.

base: nf4. QLoRA proper: the Linears become bitsandbytes 4-bit NormalFloat (double quantization) and
peft adapters train on top; at the end the adapters are merged into the dequantized weights, written
dense in the working dtype for a following gptq/rtn stage. The notes say how far that stage's grid (round
to nearest on it, as a yardstick) moves the merged weights. `merge: false` writes the input's own weights W0
instead (dense, working dtype: not their NF4 rounding, so the quantizer that follows starts from the real
weights) and the adapters as the PEFT LoRA adapter in `qat/`. The plan lets only a quantizer (gptq, rtn,
autoround) follow; it quantizes W0 and the runner keeps `qat/` beside its weights, unchanged. The adapter was
trained over NF4, not over that grid: the notes measure how far each moves W0, relative to its norm.

After a sparsity stage (base grid, merged) the pruned Linears keep their zeros: the start holds them on
the grid's zero points (GPTQ treats them as fixed zeros), the forward fake-quantizes (W0 + (alpha/r) B A)
with the pruned entries 0, and the export writes the zero point there (dequantized exactly 0); counted in
the notes. `merge: false` and base nf4 add dense adapters over the base and are refused after one.

Both train with llmslim.training.student (the loss terms and teacher of distill; default: logits KL
against the original model), with its checkpoints, resume and accelerate scale-out. Dense models only:
MoE experts are fused parameters that LoRA cannot wrap.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointWriter, LazyModel
from ..formats.compressed import compress_linear
from ..formats.lora import QAT_ADAPTER_DIR as ADAPTER
from ..formats.lora import write_adapter
from ..layerwise import walk
from ..plan import PlanError, PlanState
from ..stage import StageContext, StageResult
from ..training.fakequant import QatLinear
from ..training.masks import zero_counts
from ..training.sharding import fsdp_requested
from ..training.student import train_student
from . import gptq
from .configs.gptq import GptqConfig, QuantFields
from .configs.qat import QatConfig
from .distill import check_attention
from .gptq.core import hold_zeros, rtn_quantize
from .gptq.format import QuantFormat, disk_name
from .gptq.layer import collect_hessians, quantize_matrix, scheme_for

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- plan


def plan(state: PlanState, cfg: QatConfig) -> PlanState:
    check_attention(state, cfg)
    if state.adapter.is_moe:
        raise PlanError("base", f"{state.config.model_type}: qat trains LoRA adapters on Linear layers and MoE "
                                "experts are fused parameters; quantize MoE models with gptq or rtn")
    if state.sparsity is not None and (cfg.base == "nf4" or not cfg.merge):
        field, what = (("base", "base nf4 merges its dense adapters into the NF4 weights") if cfg.base == "nf4" else
                       ("merge", "merge: false serves the LoRA adapter apart, dense over the base"))
        raise PlanError(field, f"{what}, which would fill the zeros of the sparsity stage before it; use base: grid "
                               "with merge: true (it keeps the mask)")
    if cfg.base == "nf4":
        if fsdp_requested():  # accelerate's launch config asks for FSDP
            raise PlanError("base", "base nf4 cannot train under FSDP: FSDP2 does not shard bitsandbytes' packed "
                                    "4-bit weights (accelerate leaves them replicated) and llmslim cannot gather "
                                    "them with the adapters; run it on one process or under DDP "
                                    "(accelerate launch --multi_gpu)")
        if cfg.merge:
            return state  # dense in, dense out: the stage after it quantizes
        return replace(state, lora_rank=cfg.lora.r, lora_trained_on="NF4")  # the input's weights + the adapter
    state = gptq.plan(state, cfg)
    return state if cfg.merge else replace(state, lora_rank=cfg.lora.r)  # the adapter beside the base


# ---------------------------------------------------------------- base: grid


def _grid_start(ctx: StageContext, cfg: QatConfig, fmt: QuantFormat, targets: list[list[Any]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """name -> (W0 float32 [out, in] on the grid, scale [out, G], zero [out, G]) for every target Linear, by
    rtn or by GPTQ calibrated layer by layer on what the already-quantized layers produce."""
    lazy = ctx.lazy_model()
    start: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    gcfg = GptqConfig(data=cfg.calib_data or cfg.data, bits=cfg.bits, group_size=cfg.group_size,
                      symmetric=cfg.symmetric, ignore=cfg.ignore, per_channel_fallback=cfg.per_channel_fallback,
                      observer=cfg.observer)  # gptq's act-order: static groups, no g_idx, as fake_quant's grid

    sparse = set(ctx.before.sparse_linears)

    def quantize(layer: nn.Module, i: int, hessians: Any) -> None:
        for t in targets[i]:
            lins: list[Any] = [layer.get_submodule(n) for n in t.names]
            W = torch.cat([lin.weight.data.float() for lin in lins])
            H = hessians.linear[t.names].H if hessians is not None else None
            # after a sparsity stage its zeros start on the grid's zero points (dequantized exactly 0)
            held = [f"model.layers.{i}.{n}" in sparse for n in t.names]
            zeros = torch.cat([lin.weight.data == 0 if h else torch.zeros_like(lin.weight.data, dtype=torch.bool)
                               for h, lin in zip(held, lins)]) if any(held) else None
            res = quantize_matrix(W, H, gcfg, fmt, ctx.dtype, fixed_zero=zeros)  # scales as the export stores them
            if zeros is not None:  # rtn's too (gptq already holds them)
                gs = fmt.group_for(W.shape[1])
                res = hold_zeros(res, zeros, W.shape[1] if gs in (None, -1) else gs)
            lo = 0
            for name, lin in zip(t.names, lins):
                hi = lo + lin.out_features
                start[f"model.layers.{i}.{name}"] = (res.weight[lo:hi].clone(), res.scale[lo:hi].clone(),
                                                     res.zero[lo:hi].clone())
                lin.weight.data = res.weight[lo:hi].to(lin.weight.dtype)  # the next layer sees the quantized one
                lo = hi

    with ctx.progress.track(f"{ctx.stage.label}: {cfg.init} start on the W{fmt.bits} grid", len(lazy.layers)) as task:
        if cfg.init == "gptq":
            tokens = ctx.data.calibration(cfg.calib_data or cfg.data)
            from ..layerwise import capture_inputs

            inputs = capture_inputs(lazy, tokens, batch_size=8, device=ctx.device)
            for step in walk(lazy, inputs, device=ctx.device):
                quantize(step.layer, step.index, collect_hessians(step.layer, targets[step.index], step.inputs,
                                                                  ctx.device, step.index))
                task.advance()
        else:
            for i in range(len(lazy.layers)):
                # on the device the rtn stage would use: a GPU's scales can differ from a CPU's in the last bit
                quantize(lazy.materialize(i).to(ctx.device), i, None)
                lazy.release(i)
                task.advance()
    return start


def _grid_student(ctx: StageContext, cfg: QatConfig) -> tuple[Any, list[list[Any]], QuantFormat]:
    """The student: the input model in float32, every target Linear a QatLinear on its starting grid."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    fmt = QuantFormat.of(cfg)
    model: Any = LazyModel(ctx.source, torch.float32).materialize_all()
    targets, _ = gptq.targets_by_layer(model, ctx.source.adapter, cfg.ignore)
    start = _grid_start(ctx, cfg, fmt, targets)
    torch.manual_seed(ctx.seed)  # the adapters' random start: the same in every run of the recipe
    for p in model.parameters():
        p.requires_grad_(False)
    sparse = set(ctx.before.sparse_linears)
    for full, (w0, scale, zero) in start.items():
        parent_name, child = full.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        pruned = lin.weight.data == 0 if full in sparse else None  # the input's zeros (W0 has them too)
        lin.weight.data = w0
        gs = fmt.group_for(lin.in_features)
        assert gs is not None
        lora_cfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0)  # type: ignore[arg-type]
        lora = LoraLinear(lin, "default", lora_cfg, r=cfg.lora.r, lora_alpha=cfg.lora.alpha)  # type: ignore[arg-type]
        setattr(parent, child, QatLinear(lora, scale, zero, fmt.bits, lin.in_features if gs == -1 else gs,
                                         learn_scales=cfg.learn_scales, export_dtype=ctx.dtype, merge=cfg.merge,
                                         pruned=pruned))
    return model.to(ctx.device), targets, fmt


def _write_grid(ctx: StageContext, cfg: QatConfig, model: Any, targets: list[list[Any]], fmt: QuantFormat
                ) -> tuple[Any, dict]:
    """The trained model as compressed-tensors: each QatLinear's integers, scales and zero points (what its
    last forward would use), everything else in the working dtype; with merge: false its adapters too, as a
    PEFT LoRA adapter in `qat/` (lora_alpha as trained: the scaling alpha / r is the training's)."""
    adapter = ctx.source.adapter  # dense models only (plan): memory names are checkpoint names
    compressed: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    flipped, total = 0, 0
    masks: dict[str, torch.Tensor] = {}
    written: dict[str, torch.Tensor] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QatLinear):
            continue
        if not cfg.merge:
            b, a, _ = module.adapter()
            pairs[name] = (b.cpu(), a.cpu())
        q, scale, zero, w = module.export()
        if module.pruned is not None:  # counted in what a loader computes from the export: (q - z) s
            masks[name], written[name] = module.pruned, w
        flipped += module.changed(q)
        total += q.numel()
        index = int(name.split(".")[2])
        prefix = f"model.layers.{index}."
        scheme = scheme_for(fmt, module.base.in_features, False)
        compressed.update(compress_linear(disk_name(adapter, prefix, name[len(prefix):]), q, scale, zero, None,
                                          scheme, dtype=ctx.dtype))
        plain = nn.Linear(module.base.in_features, module.base.out_features, bias=module.base.bias is not None)
        plain.weight.data = w
        if module.base.bias is not None:
            plain.bias.data = module.base.bias.data
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, plain)
        replaced.add(f"{name}.weight")
    model = model.to("cpu")
    rest = {k: v.to(ctx.dtype) for k, v in model.state_dict().items() if k not in replaced}
    config = copy.deepcopy(ctx.after.config)
    config.dtype = ctx.dtype
    config.quantization_config = gptq.config_block(ctx, fmt, False, model, targets)
    writer = CheckpointWriter(ctx.out_dir, max_shard_bytes=ctx.max_shard_bytes)  # the main process only (run)
    writer.add_state(adapter, rest, model.config)
    writer.add(compressed)
    writer.close(config)
    if not cfg.merge:  # the base is the frozen integers (nothing changed); the training is in the adapter
        size = write_adapter(ctx.out_dir / ADAPTER, pairs, ctx.dtype, sorted(pairs), alpha=cfg.lora.alpha)
        return config, {"adapter": ADAPTER, "rank": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "adapter_bytes": size}
    notes: dict[str, Any] = {
        "integers_changed_by_training": f"{flipped:,} of {total:,} ({100 * flipped / max(total, 1):.2f} %)"}
    if masks:
        notes["sparsity_kept"] = zero_counts(masks, written)
    return config, notes


# ---------------------------------------------------------------- base: nf4


def _nf4_student(ctx: StageContext, cfg: QatConfig) -> Any:
    """The input model with every target Linear as bitsandbytes NF4 (double quantization) plus peft LoRA."""
    model: Any = LazyModel(ctx.source, torch.float32).materialize_all()
    targets, _ = gptq.targets_by_layer(model, ctx.source.adapter, cfg.ignore)
    torch.manual_seed(ctx.seed)  # the adapters' random start: the same in every run of the recipe
    names = [f"model.layers.{i}.{n}" for i, layer_targets in enumerate(targets) for t in layer_targets for n in t.names]
    return nf4_lora(model, names, cfg.lora.r, cfg.lora.alpha, ctx.device)


def nf4_lora(model: Any, names: list[str], r: int, alpha: float, device: torch.device) -> Any:
    """QLoRA's student: the Linears `names` of `model` as bitsandbytes NF4 (double quantization, float32
    compute), everything frozen, peft LoRA adapters (rank r, scale alpha / r) on those Linears."""
    from bitsandbytes.nn import Linear4bit, Params4bit
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    for full in names:
        parent_name, child = full.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        q = Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                       compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        q.weight = Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                              compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        # On a CPU with AVX512_BF16, bitsandbytes 0.50 repacks the weight for its inference kernel at the first
        # forward in eval mode (eval_data's perplexity) and keeps that layout: its matmul then has no backward
        # (every later step would silently lose the gradient through the frozen base) and dequantize_4bit reads
        # the new layout as the old (the merge and the notes would be noise). Keep the layout training uses.
        q.support_avx512bf16_for_cpu = False
        setattr(parent, child, q.to(device))  # bitsandbytes quantizes the weight on this move
    return get_peft_model(model.to(device), LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names, bias="none"))  # type: ignore[arg-type]


def _dequantized(weight: Any) -> torch.Tensor:
    """An NF4 Params4bit's dense weight, in the layout nf4_lora keeps (never bitsandbytes' CPU inference packing)."""
    import bitsandbytes.functional as bnbf

    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError("an NF4 weight was repacked for bitsandbytes' CPU inference kernel: its layout is not "
                           "the one dequantize_4bit reads (nf4_lora turns that repacking off)")
    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


@torch.no_grad()
def merge_nf4(model: Any) -> Any:
    """The dense model QLoRA trained: each NF4 Linear of the peft `model` replaced by a float32 Linear
    holding its dequantized weight plus its adapters' delta (alpha / r) B A; returns the base model."""
    from bitsandbytes.nn import Linear4bit

    base = model.get_base_model()
    for name, module in list(base.named_modules()):
        if not hasattr(module, "base_layer") or not isinstance(module.base_layer, Linear4bit):
            continue
        b = module.base_layer
        weight: Any = b.weight
        w = _dequantized(weight).float()
        w = w + module.get_delta_weight(module.active_adapters[0]).float()
        plain = nn.Linear(w.shape[1], w.shape[0], bias=b.bias is not None)
        plain.weight.data = w
        if b.bias is not None:
            plain.bias.data = b.bias.data.float()
        parent_name, child = name.rsplit(".", 1)
        setattr(base.get_submodule(parent_name), child, plain)
    return base


def _next_grid_shift(ctx: StageContext, weights: dict[str, torch.Tensor], what: str) -> dict[str, str]:
    """How far the next stage's grid (rtn on it, as a yardstick) moves `weights`, relative to their norm, as a
    note ({} when no quantizing stage follows)."""
    nxt = ctx.recipe.stages[ctx.stage.index + 1].config if ctx.stage.index + 1 < len(ctx.recipe.stages) else None
    if not isinstance(nxt, QuantFields):
        return {}
    shift, norm = 0.0, 0.0
    for w in weights.values():
        gs = QuantFormat.of(nxt).group_for(w.shape[1])
        if gs is not None:
            w = w.float()  # one Linear at a time: no float32 copy of the whole model
            shift += float((rtn_quantize(w, bits=nxt.bits, group_size=gs, symmetric=nxt.symmetric).weight - w)
                           .pow(2).sum())
            norm += float(w.pow(2).sum())
    if not norm:
        return {}
    return {"next_grid_shift": f"rounding {what} to the next stage's W{nxt.bits} grid (rtn) moves them by "
                               f"{100 * (shift / norm) ** 0.5:.2f} % of their norm"}


def _merge_nf4(ctx: StageContext, model: Any) -> tuple[Any, dict[str, Any]]:
    """`merge_nf4`, and how far the next stage's grid moves the merged weights."""
    names = {n for n, m in model.get_base_model().named_modules() if hasattr(m, "base_layer")}
    base = merge_nf4(model)
    notes = {"base": "nf4 (bitsandbytes, double quantization), adapters merged into the dequantized weights",
             **_next_grid_shift(ctx, {n: base.get_submodule(n).weight.data for n in sorted(names)},
                                "the merged weights")}
    return base, notes


@torch.no_grad()
def _nf4_apart(ctx: StageContext, cfg: QatConfig, model: Any) -> tuple[Any, dict[str, Any]]:
    """merge: false over NF4: the input's own dense weights W0 (not their NF4 rounding: the quantizing stage
    that follows starts from the real weights) in the working dtype, and the adapters as a PEFT LoRA adapter in
    `qat/` (lora_alpha as trained). The notes say how far NF4, which the adapter was trained over, and the
    next stage's grid, which it will be served over, each move W0."""
    base = LazyModel(ctx.source, ctx.dtype).materialize_all()
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    moved, norm = 0.0, 0.0
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "base_layer"):
            key = module.active_adapters[0]
            pairs[name] = (module.lora_B[key].weight.detach().cpu(), module.lora_A[key].weight.detach().cpu())
            weight: Any = module.base_layer.weight
            w = base.get_submodule(name).weight.data.float()
            moved += float((_dequantized(weight).float().cpu() - w).pow(2).sum())
            norm += float(w.pow(2).sum())
    w0 = {n: base.get_submodule(n).weight.data for n in sorted(pairs)}
    linears = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]  # short target names only if exact
    size = write_adapter(ctx.out_dir / ADAPTER, pairs, ctx.dtype, linears, alpha=cfg.lora.alpha)
    notes = {"base": "the input's weights, dense; the adapter trained over their NF4 rounding (bitsandbytes, double "
                     "quantization) and is written apart", "adapter": ADAPTER, "rank": cfg.lora.r,
             "lora_alpha": cfg.lora.alpha, "adapter_bytes": size,
             "nf4_shift": f"NF4, which the adapter trained over, moves the base weights by "
                          f"{100 * (moved / max(norm, 1e-30)) ** 0.5:.2f} % of their norm",
             **_next_grid_shift(ctx, w0, "the base weights")}
    return base, notes


# ---------------------------------------------------------------- the stage


def run(ctx: StageContext, cfg: QatConfig) -> StageResult:
    if cfg.base == "grid":
        student, targets, fmt = _grid_student(ctx, cfg)
        result, notes, in_memory = train_student(ctx, cfg, student)
        if not ctx.is_main_process:  # it trained with the main process, which writes the stage
            return StageResult({}, notes, in_memory)
        config, grid_notes = _write_grid(ctx, cfg, result.model, targets, fmt)
        notes.update({"grid": f"W{fmt.bits} {'g' + str(fmt.group_size) if fmt.group_size != -1 else 'per channel'} "
                              f"{'symmetric' if fmt.symmetric else 'asymmetric'}", "init": cfg.init,
                      "learn_scales": cfg.learn_scales, **grid_notes})
        return StageResult(config, notes, f"student in float32 ({'sharded' if result.sharded else 'whole model'}, "
                                          f"frozen on the grid) with LoRA adapters; {in_memory}")
    result, notes, in_memory = train_student(ctx, cfg, _nf4_student(ctx, cfg))
    if not ctx.is_main_process:
        return StageResult({}, notes, in_memory)
    model, nf4_notes = _merge_nf4(ctx, result.model) if cfg.merge else _nf4_apart(ctx, cfg, result.model)
    model = model.to("cpu").to(ctx.dtype)
    ctx.save(model)
    notes.update(nf4_notes)
    return StageResult(model.config, notes, f"student with NF4 base weights and LoRA adapters; {in_memory}")
