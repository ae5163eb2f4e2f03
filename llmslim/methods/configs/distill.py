"""Recipe parameters of `distill` (the method: methods/distill.py); the fields it shares with qat are in
training/config.py."""

from __future__ import annotations

from ...training.config import TrainFields


class DistillConfig(TrainFields):
    """Distillation from the original model (or `teacher`) into what the earlier stages left: logits KL,
    hidden-state distance, attention relations (MiniLMv2) and/or LM loss, trained with accelerate, resumable
    every `save_every` steps. After a sparsity stage (sparsegpt, wanda) the Linears it pruned keep every zero,
    all weights or LoRA."""

