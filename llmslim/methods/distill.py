"""distill: knowledge distillation from the model as it was before the recipe cut it (Minitron-style recovery).

The student is the stage's input (what the earlier stages left); the teacher is the recipe's source model
(or `teacher:`). The loss terms, the layer mapping of the hidden term and the loop are
llmslim.training.student (shared with qat); width pruning keeps hidden_size, so hidden states compare
directly. trainable: all trains every weight in float32; lora trains peft adapters and merges them
before the checkpoint is written. After a sparsity stage the Linears it pruned keep their zeros, in
training and in the checkpoint (llmslim.training.masks), counted in the notes. The plan refuses a teacher
with another vocabulary or tokenizer, a hidden term with no mappable layers, a `hidden_layers` pair naming
a layer the student (as the earlier stages leave it) or the teacher (the recipe's model as loaded, or
`teacher:`) does not have, and an attention term whose relation heads do not divide both sides' q/k/v
widths (`check_attention`, qat's plan too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import LazyModel
from ..errors import UserError
from ..loading import has_tokenizer, resolve_model
from ..plan import PlanError, PlanState
from ..stage import StageContext, StageResult
from ..training.config import TrainFields
from ..training.masks import apply_masks, merge_masked, sparse_masks, zero_counts
from ..training.student import attention_shape, train_student
from .configs.distill import DistillConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- plan


def _teacher_config(teacher: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(resolve_model(teacher, field="teacher")))
    except UserError as e:
        raise PlanError("teacher", str(e).removeprefix("teacher: ")) from None


def plan(state: PlanState, cfg: DistillConfig) -> PlanState:
    shape = state.shape
    if cfg.loss.balance and not state.adapter.is_moe:
        raise PlanError("loss", f"loss.balance {cfg.loss.balance}: the load-balancing term needs an MoE student "
                                f"(Mixtral, Qwen2-MoE, Qwen3-MoE; e.g. after moefy); this one is "
                                f"'{state.config.model_type}'")
    # the default teacher is the recipe's model as loaded, whatever the stages before this one cut
    teacher_layers = state.original.num_hidden_layers if state.original is not None else None
    teacher_hidden = None
    if cfg.teacher is not None and cfg.uses_teacher:
        tc = _teacher_config(cfg.teacher)
        if tc.vocab_size != shape.vocab:
            raise PlanError("teacher", f"the teacher's vocabulary has {tc.vocab_size} tokens and the student's "
                                       f"{shape.vocab}: distillation needs the same tokenizer")
        teacher_layers, teacher_hidden = tc.num_hidden_layers, tc.hidden_size
        _check_tokenizers(state.source_dir, Path(resolve_model(cfg.teacher, field="teacher")))
    if cfg.loss.hidden and teacher_hidden is not None and teacher_hidden != shape.hidden:
        raise PlanError("loss", f"loss.hidden {cfg.loss.hidden}: no mappable layers: the teacher's hidden size is "
                                f"{teacher_hidden} and the student's {shape.hidden}")
    check_attention(state, cfg)
    if cfg.loss.hidden or cfg.loss.attention:
        if cfg.hidden_layers is not None:
            if not cfg.hidden_layers:
                term = "loss.hidden" if cfg.loss.hidden else "loss.attention"
                raise PlanError("hidden_layers", f"hidden_layers is empty but {term} is on: map at least one "
                                                 "student layer to a teacher layer, or leave it out for the default")
            for s, t in cfg.hidden_layers.items():
                if not 0 <= s < shape.layers:
                    raise PlanError("hidden_layers", f"student layer {s} does not exist (the student has "
                                                     f"{shape.layers} layers here)")
                if teacher_layers is not None and not 0 <= t < teacher_layers:
                    who = "the teacher" if cfg.teacher else "the teacher, the recipe's model before the first stage,"
                    raise PlanError("hidden_layers", f"teacher layer {t} does not exist ({who} has "
                                                     f"{teacher_layers} layers)")
    return state


def check_attention(state: PlanState, cfg: TrainFields) -> None:
    """With loss.attention on: the relation heads divide the q/k/v widths of the student (as the earlier
    stages leave it) and the teacher, one line when not (distill's plan and qat's)."""
    if not cfg.loss.attention:
        return
    teacher = _teacher_config(cfg.teacher) if cfg.teacher is not None else state.original
    if teacher is None:
        return
    try:
        attention_shape(cfg, state.config, teacher)
    except ValueError as e:
        raise PlanError("attention_relation_heads", str(e)) from None


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


def _load_student(ctx: StageContext, cfg: DistillConfig) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The student, and the sparsity masks it keeps in its forward (name -> pruned; none without a sparsity
    stage before this one)."""
    model: Any = LazyModel(ctx.source, torch.float32).materialize_all().to(ctx.device)  # float32 master weights
    masks = sparse_masks(model, ctx.before.sparse_linears)
    for p in model.parameters():
        p.requires_grad_(cfg.trainable == "all")
    if cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(ctx.seed)  # the adapters' random start: the same in every run of the recipe
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft accepts floats
                                                 lora_dropout=cfg.lora.dropout,
                                                 target_modules=list(cfg.lora.targets), bias="none"))
    apply_masks(model.get_base_model() if cfg.trainable == "lora" else model, masks)
    return model, masks


def run(ctx: StageContext, cfg: DistillConfig) -> StageResult:
    student, masks = _load_student(ctx, cfg)
    result, notes, in_memory = train_student(ctx, cfg, student)
    notes["trainable"] = cfg.trainable if cfg.trainable == "all" else f"lora r={cfg.lora.r}, merged"
    what = (f"student in float32 ({'sharded' if result.sharded else 'whole model'}) with "
            f"{'AdamW states' if cfg.trainable == 'all' else 'LoRA adapters'}; {in_memory}")
    if not ctx.is_main_process:  # it trained with the main process, which writes the stage
        return StageResult({}, notes, what)
    model: Any = result.model
    if cfg.trainable == "lora":
        merge_masked(model.get_base_model())  # the masked adapters first: peft's merge would add them dense
        model = model.merge_and_unload()
    model = model.to("cpu").to(ctx.dtype)
    if masks:  # the sparsity stage's zeros, counted in the weights written
        notes["sparsity_kept"] = zero_counts(masks, {n: model.get_submodule(n).weight for n in masks})
    ctx.save(model)
    return StageResult(model.config, notes, what)
