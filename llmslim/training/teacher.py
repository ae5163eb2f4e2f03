"""The teacher of a distillation: its logits (and chosen layers' hidden states and q/k/v projections) for a
batch, no gradients.

In memory (working dtype) by default; with `offload` its decoder layers stay on disk and run one at a time
(memory: one layer and the batch's activations), for machines that cannot hold two models. Layer outputs
and projections are taken with forward hooks on the decoder layers and their q/k/v_proj, the same way as
the student's (llmslim.training.student), so both sides are measured at the same place; offloaded, the hooks
go on each layer as it is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..checkpoint import Checkpoint, LazyModel, save_safetensors
from ..layerwise import capture_inputs, layer_output
from .relations import collect_projections, projection_hooks


def collect_layer_outputs(layers: nn.ModuleList, wanted: list[int]) -> tuple[dict[int, Tensor], list[Any]]:
    """Forward hooks that store the outputs of decoder layers `wanted` (by index) into the returned dict;
    remove the returned handles when done."""
    store: dict[int, Tensor] = {}
    handles = [layers[i].register_forward_hook(lambda _m, _a, out, i=i: store.__setitem__(i, layer_output(out)))
               for i in wanted]
    return store, handles


class TeacherOutputs(NamedTuple):
    logits: Tensor  # [B, S, V]
    hidden: dict[int, Tensor]  # layer -> its output [B, S, H]
    qkv: dict[int, dict[str, Tensor]]  # layer -> {q_proj|k_proj|v_proj: [B, S, W]}


class Teacher:
    """Logits, chosen layers' outputs (`layers`) and q/k/v projections (`qkv_layers`) of a frozen model for
    token batches."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, *, offload: bool = False,
                 layers: list[int] | None = None, qkv_layers: list[int] | None = None):
        self.layers_wanted = sorted(set(layers or []))
        self.qkv_wanted = sorted(set(qkv_layers or []))
        self.device, self.offload = device, offload
        self.lazy = LazyModel(ckpt, dtype)
        self.model: Any = self.lazy.model if offload else self.lazy.materialize_all().to(device)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters() if not p.is_meta)
        dtype = str(self.lazy.dtype).removeprefix("torch.")
        return (f"teacher one layer at a time from disk ({dtype})" if self.offload
                else f"teacher in memory ({n:,} parameters, {dtype})")

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> TeacherOutputs:
        tokens = tokens.to(self.device)
        if not self.offload:
            store, handles = collect_layer_outputs(self.lazy.layers, self.layers_wanted)
            projections, more = collect_projections(self.lazy.layers, self.qkv_wanted)
            try:
                logits = self.model(input_ids=tokens, use_cache=False).logits
            finally:
                for h in handles + more:
                    h.remove()
            return TeacherOutputs(logits, dict(store), projections)
        inputs = capture_inputs(self.lazy, tokens.cpu(), batch_size=tokens.shape[0], device=self.device)
        hidden = inputs.hidden[0]
        outputs: dict[int, Tensor] = {}
        qkv: dict[int, dict[str, Tensor]] = {i: {} for i in self.qkv_wanted}
        for i in range(len(self.lazy.layers)):
            layer = self.lazy.materialize(i).to(self.device)
            handles = projection_hooks(layer, qkv[i]) if i in qkv else []
            try:
                hidden = layer_output(layer(hidden, **inputs.for_layer(i).kwargs[0]))  # sliding or global (Gemma 3)
            finally:
                for h in handles:
                    h.remove()
            self.lazy.release(i)
            if i in self.layers_wanted:
                outputs[i] = hidden
        body: Any = self.model.model
        body.norm.to(self.device)
        self.model.lm_head.to(self.device)
        return TeacherOutputs(self.model.lm_head(body.norm(hidden)), outputs, qkv)


class TopKCache:
    """The teacher's top-k logits of each training window, kept on disk (one safetensors file per window,
    written atomically). A window's file is computed by a teacher forward the first time a step draws it
    (the first epoch: every epoch visits every window) and read back every later time, so later epochs run
    no teacher forward. Every step, the first epoch's included, distills against the top k
    (losses.kl_topk), never the full logits. The teacher stays loaded for the whole stage to serve misses;
    only a resumed run that finds every window cached starts without one (training.student)."""

    def __init__(self, directory: Path, k: int):
        self.dir, self.k = directory, k
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, window: int) -> Path:
        return self.dir / f"w{window:07d}.safetensors"

    def get(self, teacher: Teacher | None, windows: list[int], tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(values [B, S, k] float32, indices [B, S, k] int64) for windows (ids) whose tokens are `tokens`."""
        missing = [j for j, w in enumerate(windows) if not self._file(w).is_file()]
        if missing:
            assert teacher is not None, "top-k cache miss without a teacher"
            logits = teacher(tokens[missing]).logits
            top = logits.float().topk(self.k, dim=-1)
            for j, v, ix in zip(missing, top.values, top.indices):
                tmp = self._file(windows[j]).with_suffix(".tmp")
                save_safetensors({"values": v.cpu().contiguous(), "indices": ix.to(torch.int32).cpu().contiguous()}, tmp)
                tmp.replace(self._file(windows[j]))
        values, indices = [], []
        for w in windows:
            with safe_open(str(self._file(w)), "pt") as f:
                values.append(f.get_tensor("values"))
                indices.append(f.get_tensor("indices").long())
        return torch.stack(values), torch.stack(indices)
