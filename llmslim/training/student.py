"""What a training stage does with its student: the teacher, the layer mapping, the loss terms, the loop.

distill and qat both call `train_student`; they differ in what the student is (the model the earlier
stages left, or that model with its Linears fake-quantized on an export grid) and in what they write.
Loss = logits x KL(teacher || student) at temperature T (x T^2) + hidden x distance of mapped hidden
states + attention x KL of their self-attention relations (llmslim.training.relations) + lm x
cross-entropy (llmslim.training.losses). The hidden and attention terms compare student layer j with the
teacher layer it came from: after drop_layers, the kept layers' original indices, composed over every
drop_layers stage before this one (`layer_origin`), or `hidden_layers:`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import Adapter
from ..checkpoint import Checkpoint
from ..loading import resolve_model
from ..stage import StageContext
from . import losses, relations
from .config import TrainFields
from .loop import TrainResult, train
from .teacher import Teacher, TopKCache, collect_layer_outputs

log = logging.getLogger(__name__)


def layer_origin(history: list[dict[str, Any]], n_original: int) -> list[int]:
    """Original layer index of each current layer, after the drop_layers stages recorded in `history`
    (stage records with their notes; `kept` lists the surviving input layers of each)."""
    origin = list(range(n_original))
    for rec in history:
        if rec.get("method") == "drop_layers":
            origin = [origin[k] for k in rec["notes"]["kept"]]
    return origin


def default_mapping(history: list[dict[str, Any]], n_student: int, n_teacher: int) -> dict[int, int]:
    """student layer -> teacher layer: where each student layer came from (the teacher being the original)."""
    origin = layer_origin(history, n_teacher)
    if len(origin) != n_student:  # the layer count changed some other way: pair layers by relative depth
        return {j: round((j + 1) * n_teacher / n_student) - 1 for j in range(n_student)}
    return dict(enumerate(origin))


def make_loss(cfg: TrainFields, teacher: Teacher | None, cache: TopKCache | None, mapping: dict[int, int],
              relation_heads: int = 1):
    """The loss function of llmslim.training.loop for these weights: (model, window ids, tokens) -> loss."""
    wanted = sorted(mapping)

    def loss_fn(model: nn.Module, ids: list[int], tokens: Tensor) -> tuple[Tensor, dict[str, float]]:
        core: Any = model.module if hasattr(model, "module") else model  # DDP wraps the model
        layers = decoder_layers(core)
        store, handles = collect_layer_outputs(layers, wanted if cfg.loss.hidden else [])
        qkv, more = relations.collect_projections(layers, wanted if cfg.loss.attention else [])
        try:
            out = model(input_ids=tokens, use_cache=False, **({"output_router_logits": True} if cfg.loss.balance else {}))
            logits = out.logits
        finally:
            for h in handles + more:
                h.remove()
        total = logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, float] = {}
        if cfg.uses_teacher:
            t_qkv: dict[int, dict[str, Tensor]] = {}
            if cache is not None:
                values, indices = cache.get(teacher, ids, tokens)
                kl = losses.kl_topk(logits, values.to(logits.device), indices.to(logits.device),
                                    temperature=cfg.temperature, chunk=cfg.logits_chunk)
                t_hidden: dict[int, Tensor] = {}
            else:
                assert teacher is not None
                t_logits, t_hidden, t_qkv = teacher(tokens)
                kl = (losses.kl_logits(logits, t_logits, temperature=cfg.temperature, reverse=cfg.reverse_kl,
                                       chunk=cfg.logits_chunk) if cfg.loss.logits else logits.new_zeros(()))
            if cfg.loss.logits:
                total = total + cfg.loss.logits * kl
                terms["logits"] = float(kl.detach())
            if cfg.loss.hidden:
                h = torch.stack([losses.hidden_loss(store[s], t_hidden[t], cfg.hidden_kind)
                                 for s, t in mapping.items()]).mean()
                total = total + cfg.loss.hidden * h
                terms["hidden"] = float(h.detach())
            if cfg.loss.attention:
                a = relations.attention_loss(qkv, t_qkv, mapping, relation_heads)
                total = total + cfg.loss.attention * a
                terms["attention"] = float(a.detach())
        if cfg.loss.balance:  # transformers' load_balancing_loss_func over every MoE layer's router logits
            balance = out.aux_loss.float()
            total = total + cfg.loss.balance * balance
            terms["balance"] = float(balance.detach())
        if cfg.loss.lm:
            lm = losses.lm_loss(logits, tokens)
            total = total + cfg.loss.lm * lm
            terms["lm"] = float(lm.detach())
        return total, terms

    return loss_fn


def decoder_layers(model: Any) -> nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def teacher_checkpoint(ctx: StageContext, cfg: TrainFields) -> Checkpoint:
    """The teacher's checkpoint: `teacher:` when given, else the recipe's model before the first stage."""
    if cfg.teacher is None:
        assert ctx.original is not None, "the pipeline passes the source model"
        return ctx.original
    return Checkpoint(resolve_model(cfg.teacher, field="teacher"))


def moe_block_params(adapter: Adapter, student: Any) -> set[int]:
    """ids of the parameters of the student's MoE blocks (router, experts, shared expert and its gate)."""
    return {id(p) for layer in decoder_layers(student) if adapter.experts(layer) is not None
            for p in adapter.mlp(layer).parameters()}


def train_student(ctx: StageContext, cfg: TrainFields, student: Any) -> tuple[TrainResult, dict[str, Any], str]:
    """Train `student` (its parameters with requires_grad) in place on cfg.data against the teacher; returns
    the loop's result, the stage notes so far, and what the teacher held in memory. The MoE fields the
    recipe left null are filled in for the student first (TrainFields.for_student); the notes list the MoE
    defaults so applied under `moe_defaults`."""
    adapter = Adapter.for_config(ctx.source.config)
    cfg, moe_defaults = cfg.for_student(adapter.is_moe)
    assert cfg.moe_lr_scale is not None
    lr_groups = {"moe": (moe_block_params(adapter, student), cfg.moe_lr_scale)} if adapter.is_moe else {}
    n_student = len(decoder_layers(student))
    teacher_ckpt = teacher_checkpoint(ctx, cfg)
    n_teacher = teacher_ckpt.config.num_hidden_layers
    mapping = ({int(s): int(t) for s, t in cfg.hidden_layers.items()} if cfg.hidden_layers is not None
               else default_mapping(ctx.history, n_student, n_teacher))
    teacher = None
    if cfg.uses_teacher and not (cfg.teacher_topk and _cache_complete(ctx, cfg)):
        teacher = Teacher(teacher_ckpt, ctx.compute_dtype or ctx.dtype, ctx.device, offload=cfg.teacher_offload,
                          layers=sorted(set(mapping.values())) if cfg.loss.hidden else [],
                          qkv_layers=sorted(set(mapping.values())) if cfg.loss.attention else [])
    heads, attention_note = 1, {}
    if cfg.loss.attention:  # the plan checked the count (check_attention); the same numbers here
        heads, sw, tw = attention_shape(cfg, ctx.source.config, teacher_ckpt.config)
        attention_note = {"attention": relations.describe(heads, sw, tw)}
    cache = TopKCache(ctx.scratch_dir / "teacher-topk", cfg.teacher_topk) if cfg.teacher_topk else None
    windows = ctx.data.evaluation(cfg.data)
    eval_windows = ctx.data.evaluation(cfg.eval_data) if cfg.eval_data else None
    in_memory = teacher.describe() if teacher else "no teacher in memory"
    log.info("%s: %d training windows of %d tokens; %s", ctx.stage.label, *windows.shape, in_memory)
    result = train(student, windows, make_loss(cfg, teacher, cache, mapping, heads), cfg, seed=ctx.seed,
                   device=ctx.device, state_dir=ctx.scratch_dir, progress=ctx.progress, label=ctx.stage.label,
                   eval_windows=eval_windows, lr_groups=lr_groups)
    notes = {"loss_weights": cfg.loss.model_dump(), "temperature": cfg.temperature,
             **({"moe_defaults": moe_defaults} if moe_defaults else {}),
             **({"moe_lr": cfg.lr * cfg.moe_lr_scale} if adapter.is_moe else {}),
             "teacher": cfg.teacher or "the recipe's model before the first stage",
             **({"hidden_layers": {str(k): v for k, v in mapping.items()}}
                if cfg.loss.hidden or cfg.loss.attention else {}),
             **attention_note,
             **({"teacher_topk": cfg.teacher_topk} if cfg.teacher_topk else {}),
             "training_windows": list(windows.shape), **result.notes()}
    return result, notes, in_memory


def attention_shape(cfg: TrainFields, student: Any, teacher: Any) -> tuple[int, tuple[int, int, int],
                                                                          tuple[int, int, int]]:
    """(relation heads, the student's q/k/v widths, the teacher's) of the attention term, from the two
    configs; ValueError (one line) when `attention_relation_heads` does not divide the widths."""
    s, t = Adapter.for_config(student).shape(student), Adapter.for_config(teacher).shape(teacher)
    sw, tw = relations.widths(s.heads, s.kv_heads, s.head_dim), relations.widths(t.heads, t.kv_heads, t.head_dim)
    return relations.relation_heads(cfg.attention_relation_heads, sw, tw, min(s.kv_heads, t.kv_heads)), sw, tw


def _cache_complete(ctx: StageContext, cfg: TrainFields) -> bool:
    """Whether a resumed run's top-k cache already holds every training window (no teacher needed)."""
    directory = ctx.scratch_dir / "teacher-topk"
    return directory.is_dir() and len(list(directory.glob("w*.safetensors"))) >= ctx.data.evaluation(cfg.data).shape[0]
