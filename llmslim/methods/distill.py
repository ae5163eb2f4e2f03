"""distill: knowledge distillation from the model as it was before the recipe cut it (Minitron-style recovery).

The student is the stage's input (what the earlier stages left); the teacher is the recipe's source model
(or `teacher:`). Loss = logits x KL(teacher || student) at temperature T (x T^2) + hidden x distance of
mapped hidden states + lm x cross-entropy (llmslim.training.losses). The hidden term compares student
layer j's output with the output of the teacher layer it came from: after drop_layers, the kept layers'
original indices, composed over every drop_layers stage before this one (`layer_origin`), or
`hidden_layers:` explicitly. Width pruning keeps hidden_size, so the states compare directly.

Training: llmslim.training.loop (accelerate; checkpoints every save_every steps; resume; DDP/FSDP under
`accelerate launch`). trainable: all trains every weight in float32; lora trains peft adapters and merges
them before the checkpoint is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint, LazyModel
from ..errors import UserError
from ..loading import has_tokenizer, resolve_model
from ..plan import PlanError, PlanState
from ..registry import Method, register
from ..stage import StageContext, StageResult
from ..training import losses
from ..training.config import TrainFields
from ..training.loop import train
from ..training.teacher import Teacher, TopKCache, collect_layer_outputs

log = logging.getLogger(__name__)


class DistillConfig(TrainFields):
    """Distillation from the original model (or `teacher`) into what the earlier stages left: logits KL,
    hidden-state distance and/or LM loss, trained with accelerate, resumable every `save_every` steps."""


# ---------------------------------------------------------------- pure: which teacher layer a student layer came from


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


# ---------------------------------------------------------------- plan


def _teacher_config(teacher: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(resolve_model(teacher, field="teacher")))
    except UserError as e:
        raise PlanError("teacher", str(e).removeprefix("teacher: ")) from None


def plan(state: PlanState, cfg: DistillConfig) -> PlanState:
    shape = state.shape
    teacher_layers, teacher_hidden = None, None
    if cfg.teacher is not None and cfg.uses_teacher:
        tc = _teacher_config(cfg.teacher)
        if tc.vocab_size != shape.vocab:
            raise PlanError("teacher", f"the teacher's vocabulary has {tc.vocab_size} tokens and the student's "
                                       f"{shape.vocab}: distillation needs the same tokenizer")
        teacher_layers, teacher_hidden = tc.num_hidden_layers, tc.hidden_size
        _check_tokenizers(state.source_dir, Path(resolve_model(cfg.teacher, field="teacher")))
    if cfg.loss.hidden:
        if teacher_hidden is not None and teacher_hidden != shape.hidden:
            raise PlanError("loss", f"loss.hidden {cfg.loss.hidden}: no mappable layers: the teacher's hidden size is "
                                    f"{teacher_hidden} and the student's {shape.hidden}")
        if cfg.hidden_layers is not None:
            if not cfg.hidden_layers:
                raise PlanError("hidden_layers", "hidden_layers is empty but loss.hidden is on: map at least one "
                                                 "student layer to a teacher layer, or leave it out for the default")
            for s, t in cfg.hidden_layers.items():
                if not 0 <= s < shape.layers:
                    raise PlanError("hidden_layers", f"student layer {s} does not exist (the student has "
                                                     f"{shape.layers} layers here)")
                if teacher_layers is not None and not 0 <= t < teacher_layers:
                    raise PlanError("hidden_layers", f"teacher layer {t} does not exist (the teacher has "
                                                     f"{teacher_layers} layers)")
    return state


def _check_tokenizers(student_dir: Path | None, teacher_dir: Path) -> None:
    """The same vocabulary (token -> id) on both sides, where both directories have a tokenizer."""
    if student_dir is None or not (has_tokenizer(student_dir) and has_tokenizer(teacher_dir)):
        return
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    if a.get_vocab() != b.get_vocab():
        diff = len(set(a.get_vocab().items()) ^ set(b.get_vocab().items()))
        raise PlanError("teacher", f"the teacher's tokenizer ({teacher_dir}) maps tokens to ids differently from the "
                                   f"model's ({diff} entries differ): distillation needs the same tokenizer")


# ---------------------------------------------------------------- run


def _load_student(ctx: StageContext, cfg: DistillConfig) -> nn.Module:
    model: Any = LazyModel(ctx.source, torch.float32).materialize_all().to(ctx.device)  # float32 master weights
    for p in model.parameters():
        p.requires_grad_(cfg.trainable == "all")
    if cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
                                                 lora_dropout=cfg.lora.dropout,
                                                 target_modules=list(cfg.lora.targets), bias="none"))
    return model


def make_loss(cfg: TrainFields, teacher: Teacher | None, cache: TopKCache | None, mapping: dict[int, int]):
    """The loss function of llmslim.training.loop for these weights: (model, window ids, tokens) -> loss."""
    wanted = sorted(mapping)

    def loss_fn(model: nn.Module, ids: list[int], tokens: Tensor) -> tuple[Tensor, dict[str, float]]:
        core: Any = model.module if hasattr(model, "module") else model  # DDP wraps the model
        layers = _decoder_layers(core)
        store, handles = collect_layer_outputs(layers, wanted if cfg.loss.hidden else [])
        try:
            logits = model(input_ids=tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        total = logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, float] = {}
        if cfg.loss.logits or cfg.loss.hidden:
            if cache is not None:
                values, indices = cache.get(teacher, ids, tokens)
                kl = losses.kl_topk(logits, values.to(logits.device), indices.to(logits.device),
                                    temperature=cfg.temperature)
                t_hidden: dict[int, Tensor] = {}
            else:
                assert teacher is not None
                t_logits, t_hidden = teacher(tokens)
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
        if cfg.loss.lm:
            lm = losses.lm_loss(logits, tokens)
            total = total + cfg.loss.lm * lm
            terms["lm"] = float(lm.detach())
        return total, terms

    return loss_fn


def _decoder_layers(model: Any) -> nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def teacher_checkpoint(ctx: StageContext, cfg: TrainFields) -> Checkpoint:
    if cfg.teacher is None:
        assert ctx.original is not None, "the pipeline passes the source model"
        return ctx.original
    return Checkpoint(resolve_model(cfg.teacher, field="teacher"))


def run(ctx: StageContext, cfg: DistillConfig) -> StageResult:
    student: Any = _load_student(ctx, cfg)
    n_student = len(_decoder_layers(student))
    teacher_ckpt = teacher_checkpoint(ctx, cfg)
    n_teacher = teacher_ckpt.config.num_hidden_layers
    mapping = ({int(s): int(t) for s, t in cfg.hidden_layers.items()} if cfg.hidden_layers is not None
               else default_mapping(ctx.history, n_student, n_teacher))
    teacher = None
    if cfg.uses_teacher:
        teacher = Teacher(teacher_ckpt, ctx.compute_dtype or ctx.dtype, ctx.device, offload=cfg.teacher_offload,
                          layers=sorted(set(mapping.values())) if cfg.loss.hidden else [])
    cache = TopKCache(ctx.scratch_dir / "teacher-topk", cfg.teacher_topk) if cfg.teacher_topk else None
    windows = ctx.data.evaluation(cfg.data)
    eval_windows = ctx.data.evaluation(cfg.eval_data) if cfg.eval_data else None
    log.info("%s: %d training windows of %d tokens; %s", ctx.stage.label, *windows.shape,
             teacher.describe() if teacher else "no teacher (lm loss only)")
    result = train(student, windows, make_loss(cfg, teacher, cache, mapping), cfg, seed=ctx.seed, device=ctx.device,
                   state_dir=ctx.scratch_dir, progress=ctx.progress, label=ctx.stage.label, eval_windows=eval_windows)
    in_memory = teacher.describe() if teacher else "no teacher (lm loss only)"
    del teacher
    model: Any = student.merge_and_unload() if cfg.trainable == "lora" else student
    model = model.to("cpu").to(ctx.dtype)
    if ctx.is_main_process:
        ctx.save(model)
    notes = {"loss_weights": cfg.loss.model_dump(), "temperature": cfg.temperature,
             "teacher": cfg.teacher or "the recipe's model before the first stage",
             "trainable": cfg.trainable if cfg.trainable == "all" else f"lora r={cfg.lora.r}, merged",
             **({"hidden_layers": {str(k): v for k, v in mapping.items()}} if cfg.loss.hidden else {}),
             "training_windows": list(windows.shape), **result.notes()}
    what = (f"student in float32 (whole model) with {'AdamW states' if cfg.trainable == 'all' else 'LoRA adapters'}"
            f"; {in_memory}")
    return StageResult(model.config, notes, what)


register(Method("distill", DistillConfig, run, plan, trains=True))
