"""The recipe fields every training stage shares (distill, qat): data and schedule, loss terms, teacher,
LoRA, checkpointing. A method's config inherits them and adds its own."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..methods.configs.base import MethodConfig

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What an MoE student trains with when the recipe leaves `loss.balance` and `moe_lr_scale` out (measured on
# stories260K, eval/bench_moe.py --defaults); a dense student gets 0 and 1
MOE_BALANCE = 0.01
MOE_LR_SCALE = 10.0


class LossWeights(BaseModel):
    """Weights of the loss terms (0 switches a term off)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    logits: float = Field(default=1.0, ge=0)
    """KL divergence between the teacher's and the student's temperature-softened next-token distributions."""
    hidden: float = Field(default=0.0, ge=0)
    """Distance between mapped student and teacher hidden states (see `hidden_layers`, `hidden_kind`)."""
    lm: float = Field(default=0.0, ge=0)
    """Next-token cross-entropy on the training text (plain fine-tuning when alone)."""
    attention: float = Field(default=0.0, ge=0)
    """Attention transfer (MiniLMv2): KL between the teacher's and the student's self-attention relations
    softmax(A A^T / sqrt(d)) of the q/k/v projections (Q-Q, K-K, V-V, causal) at the layers of the hidden
    term, cut into `attention_relation_heads` relation heads, so that students with fewer heads compare."""
    balance: float | None = Field(default=None, ge=0)
    """MoE students: the load-balancing loss of Switch Transformer and Mixtral (E x sum over experts of the
    share of tokens routed to the expert x its mean router probability, averaged over the MoE layers; 1
    when balanced), which keeps routers from collapsing onto a few experts while they train. null: 0.01
    for an MoE student, 0 for a dense one; 0 switches it off."""


class LoraFields(BaseModel):
    """LoRA adapters (peft) trained instead of the full weights, merged before the stage writes its output."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    r: int = Field(default=16, gt=0)
    """Rank of each adapter."""
    alpha: float = Field(default=32.0, gt=0)
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapters' input."""
    targets: list[str] = DEFAULT_TARGETS
    """Linear module names (suffixes) that get adapters."""


class TrainFields(MethodConfig):
    """Training parameters shared by the training stages."""

    data: str
    """Training source (from `data:`): its text packed into `seq_len` windows, shuffled with the recipe seed
    (every window once per epoch)."""
    steps: int = Field(gt=0)
    """Optimizer steps."""
    batch_size: int = Field(default=16, gt=0)
    """Windows per optimizer step, in all (across gradient accumulation and processes)."""
    grad_accum: int = Field(default=1, gt=0)
    """Micro-batches per optimizer step (batch_size must be a multiple of grad_accum x processes)."""
    lr: float = Field(default=1e-4, gt=0)
    """Peak learning rate (AdamW)."""
    moe_lr_scale: float | None = Field(default=None, gt=0)
    """MoE students: the MoE blocks (routers, experts, shared experts) train at lr x this, the rest at lr
    (routers and experts that moefy has just fitted move further than the weights around them). null: 10
    for an MoE student; 1: every weight at lr. A dense student has no MoE block and ignores it."""
    warmup: int = Field(default=0, ge=0)
    """Steps of linear warm-up from 0 to `lr`."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning rate after warm-up: cosine or linear decay to 0 at `steps`, or constant."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay (not applied to norms and biases)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Gradient clipping by global norm; null: none."""
    loss: LossWeights = LossWeights()
    """Weights of the loss terms, e.g. {logits: 1.0, hidden: 0.0, attention: 0.0, lm: 0.0}."""
    temperature: float = Field(default=1.0, gt=0)
    """Softmax temperature of the logits term (the loss is scaled by T^2)."""
    reverse_kl: float = Field(default=0.0, ge=0, le=1)
    """Share of reverse KL(student || teacher) in the logits term: 0 forward KL (default), 1 reverse, between: a mix."""
    hidden_kind: Literal["nmse", "cosine"] = "nmse"
    """Hidden-state distance: normalised MSE ||s - t||^2 / ||t||^2, or 1 - cosine similarity."""
    hidden_layers: dict[int, int] | None = None
    """Student layer -> teacher layer pairs for the hidden term (compared at the layers' outputs) and the
    attention term (at their q/k/v projections); null: every student layer with the teacher layer it came
    from (after drop_layers: the kept ones, as recorded in the stage notes)."""
    attention_relation_heads: int | None = Field(default=None, gt=0)
    """Relation heads of the attention term: each of q, k, v is cut into this many equal slices on both
    sides, so it must divide both sides' q/k/v widths (heads x head_dim, KV heads for k and v); null: the
    largest number up to the fewer KV heads of the two that does."""
    teacher: str | None = None
    """The teacher: null for the recipe's model as loaded before the first stage, or a local directory / Hub
    id of a model of the same family and vocabulary."""
    teacher_offload: bool = False
    """Run the teacher one decoder layer at a time from disk (memory: one layer) instead of keeping it in memory."""
    teacher_topk: int | None = Field(default=None, gt=0)
    """Distill against the teacher's k largest logits per token (renormalised over them; forward KL, logits
    term only) instead of its full distribution, cached on disk per training window: a teacher forward
    computes them the first time a step draws the window (the first epoch), later epochs read them back
    and run no teacher forward (the teacher stays loaded for the stage)."""
    trainable: Literal["all", "lora"] = "all"
    """What trains: every weight, or LoRA adapters (merged into the weights at the end)."""
    lora: LoraFields = LoraFields()
    """LoRA settings for `trainable: lora`."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more time)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """accelerate's mixed precision: auto is bf16 on a GPU that supports it, no (float32) on a CPU."""
    eval_data: str | None = None
    """A source (from `data:`) whose perplexity is measured every `eval_every` steps and at the end."""
    eval_every: int = Field(default=0, ge=0)
    """Steps between evaluations on `eval_data`; 0: only before and after training."""
    save_every: int = Field(default=100, gt=0)
    """Steps between checkpoints of the training state (a killed run resumes from the last one)."""
    logits_chunk: int = Field(default=8192, gt=0)
    """Vocabulary chunk of the logits loss: its working memory is a few float32 [tokens x chunk] blocks on top
    of the logits and their gradient (no float32 copy of tokens x vocabulary)."""

    @model_validator(mode="after")
    def _check_training(self) -> TrainFields:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if not (self.loss.logits or self.loss.hidden or self.loss.attention or self.loss.lm):
            raise ValueError("loss: every term has weight 0; give logits, hidden, attention or lm a positive weight")
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps})")
        if self.teacher_topk is not None and self.loss.hidden:
            raise ValueError("teacher_topk caches logits only: it cannot serve the hidden term; set loss.hidden 0")
        if self.teacher_topk is not None and self.loss.attention:
            raise ValueError("teacher_topk caches logits only: it cannot serve the attention term; set "
                             "loss.attention 0 or drop teacher_topk")
        if self.teacher_topk is not None and self.reverse_kl:
            # the reverse KL needs the teacher's log-probability at every token the student puts mass on; a
            # top-k teacher has none outside its k tokens, so the term would be infinite (or silently dropped)
            raise ValueError(f"reverse_kl {self.reverse_kl}: teacher_topk distills with forward KL only (the "
                             "teacher is known on its top k tokens alone); set reverse_kl 0 or drop teacher_topk")
        if self.eval_every and self.eval_data is None:
            raise ValueError("eval_every needs eval_data: the source to measure perplexity on")
        return self

    def data_source(self) -> str | None:
        return self.data

    def for_student(self, is_moe: bool) -> tuple[TrainFields, dict[str, float]]:
        """This config with the MoE fields the recipe left null filled in for the student (MOE_BALANCE and
        MOE_LR_SCALE for an MoE student, 0 and 1 for a dense one), and {field: value} of the MoE defaults
        so applied (empty for a dense student)."""
        balance = self.loss.balance if self.loss.balance is not None else (MOE_BALANCE if is_moe else 0.0)
        scale = self.moe_lr_scale if self.moe_lr_scale is not None else (MOE_LR_SCALE if is_moe else 1.0)
        applied = {} if not is_moe else {
            **({"loss.balance": balance} if self.loss.balance is None else {}),
            **({"moe_lr_scale": scale} if self.moe_lr_scale is None else {})}
        return self.model_copy(update={"loss": self.loss.model_copy(update={"balance": balance}),
                                       "moe_lr_scale": scale}), applied

    def data_sources(self) -> list[str]:
        """Every source this stage reads (checked against `data:`)."""
        return [self.data] + ([self.eval_data] if self.eval_data else [])

    @property
    def uses_teacher(self) -> bool:
        return bool(self.loss.logits or self.loss.hidden or self.loss.attention)
