"""The training loop every training stage shares (distill, qat): accelerate, checkpoints, resume, curves.

Batches: the training windows are visited in a seeded order (a fresh permutation per epoch); optimizer
step s takes the next `batch_size` windows, split into `grad_accum` micro-batches and, under
`accelerate launch`, across processes. Which windows a step sees therefore depends on the seed and the
step only, so one process and N processes with the same recipe see the same global batches, and a resumed
run sees exactly what the killed one would have.

accelerate does the rest: the process group and DDP, or FSDP2 when accelerate's launch config asks for
FSDP (llmslim.training.sharding, CPU processes over gloo too), through `prepare`, gradient accumulation,
mixed precision, gradient clipping, and `save_state`/`load_state` for the checkpoints (model or its
shards, optimizer, scheduler, every process's RNG states, and `_Tally`: the step, tokens and seconds so
far, the curve), written every `save_every` steps into the stage's scratch directory through a temporary
directory and a rename.

Resume is exact: a run killed anywhere and rerun on the same machine ends with the weights, curve and
counters of an uninterrupted run, bit for bit on a CPU (tests/test_faults.py). Nothing in a step depends
on what ran before it in the same process: the windows come from the seed and the step, dropout from the
saved RNG states, AdamW from its saved float32 moments, and the CPU kernels training uses are
deterministic for a given machine and thread count, so `torch.use_deterministic_algorithms` is not
needed there. On GPUs (not measured) some CUDA kernels accumulate in a nondeterministic order.

Each step logs the loss (and its terms), the learning rate and tokens/s: into the progress display, and
into the stage notes as the training curve (also plotted in the export's report), with the perplexity on
`eval_data` every `eval_every` steps.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..faults import crash_point
from ..perplexity import perplexity
from . import sharding
from .config import TrainFields

log = logging.getLogger(__name__)

# LossFn(model, window ids, tokens [b, S]) -> (loss to minimise, {term: value} for the curve)
LossFn = Callable[[nn.Module, list[int], Tensor], tuple[Tensor, dict[str, float]]]
STATE_DIR = "train-state"
MAX_CURVE_POINTS = 400


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def window_order(n_windows: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """The window ids of every step, concatenated: one seeded permutation of all windows per epoch."""
    need = steps * batch_size
    order: list[int] = []
    epoch = 0
    while len(order) < need:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order += torch.randperm(n_windows, generator=g).tolist()
        epoch += 1
    return order[:need]


def distributed_state():
    """accelerate's process state (the process group under `accelerate launch`), with a timeout long enough
    for the other processes to wait while the main one runs the stages that are not training."""
    from accelerate import PartialState

    # cpu: without a GPU, processes started by `accelerate launch --multi_gpu` (torchrun) join over gloo
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=12))


class _Tally:
    """What the training has done so far, saved with accelerate's state (register_for_checkpointing needs
    state_dict): the optimizer step, the tokens and seconds of those steps, the curve and the evaluations.
    A resumed run continues these, so its report adds up to an uninterrupted run's."""

    def __init__(self) -> None:
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        self.curve: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "seconds": self.seconds, "curve": self.curve,
                "evals": self.evals}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        # .get: a state saved by an older llmslim holds the step only (its counters restart here)
        self.step, self.tokens, self.seconds = int(d["step"]), int(d.get("tokens", 0)), float(d.get("seconds", 0))
        self.curve, self.evals = list(d.get("curve", [])), list(d.get("evals", []))


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    curve: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # training time of every step in the result, across the runs a kill split it into
    tokens: int = 0
    processes: int = 1
    sharded: bool = False
    model: Any = None  # the trained model, whole: the one passed in, or (FSDP) gathered on the main process

    def notes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps, "processes": self.processes, "tokens_seen": self.tokens,
                               "train_seconds": round(self.seconds, 2), "curve": self.curve}
        if self.sharded:
            out["sharding"] = f"FSDP2 over {self.processes} processes"
        if self.resumed_from:
            out["resumed_from_step"] = self.resumed_from
        if self.evals:
            out["eval"] = self.evals
            out["eval_ppl"] = f"{self.evals[0]['ppl']:.4f} -> {self.evals[-1]['ppl']:.4f}"
        if self.curve:
            out["loss"] = f"{self.curve[0]['loss']:.4f} -> {self.curve[-1]['loss']:.4f}"
        return out


def _param_groups(model: nn.Module, weight_decay: float, lr: float,
                  lr_groups: dict[str, tuple[set[int], float]]) -> list[dict[str, Any]]:
    """AdamW's parameter groups: with and without weight decay (norms, biases) at `lr`, then the same two
    for each named group of `lr_groups` (name -> (parameter ids, lr multiplier)) that has trainable
    parameters, at lr x its multiplier. The first group is at `lr` (the curve's `lr`)."""
    groups: dict[str, tuple[list[nn.Parameter], list[nn.Parameter]]] = {"": ([], [])}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = next((k for k, (ids, _) in lr_groups.items() if id(p) in ids), "")
            decay, no_decay = groups.setdefault(key, ([], []))
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    out = []
    for key, (decay, no_decay) in groups.items():
        group_lr = lr * (lr_groups[key][1] if key else 1.0)
        out += [{"params": decay, "weight_decay": weight_decay, "lr": group_lr, "name": key},
                {"params": no_decay, "weight_decay": 0.0, "lr": group_lr, "name": key}]
    return out[:2] + [g for g in out[2:] if g["params"]]


def train(model: nn.Module, windows: Tensor, loss_fn: LossFn, cfg: TrainFields, *, seed: int, device: torch.device,
          state_dir: Path, progress: Any, label: str, eval_windows: Tensor | None = None,
          lr_groups: dict[str, tuple[set[int], float]] | None = None) -> TrainResult:
    """Train `model` (its parameters with requires_grad) on token windows [N, S] for cfg.steps steps,
    minimising loss_fn; resumes from `state_dir`/train-state when a killed run left one. `lr_groups`: name
    -> (ids of parameters, multiplier of cfg.lr) for parameters that train at another rate (the curve
    records each as `lr_<name>`). The trained model
    is `result.model`: `model` itself, trained in place, or under FSDP a plain copy with the gathered
    weights on the main process (None on the others). The caller writes it out."""
    from accelerate.utils import set_seed

    dist = distributed_state()
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    acc = sharding.accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
                               cpu=device.type == "cpu", step_scheduler_with_optimizer=False)
    world, rank, fsdp = acc.num_processes, acc.process_index, sharding.is_fsdp(acc)
    per_micro = cfg.batch_size // cfg.grad_accum
    if per_micro % world:
        raise UserError(f"batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum} = {per_micro} windows per "
                        f"micro-batch cannot be split evenly over {world} processes; make batch_size a multiple "
                        f"of grad_accum x {world}")
    local = per_micro // world
    if cfg.gradient_checkpointing:
        model_any: Any = model
        model_any.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    twin = sharding.skeleton(model) if fsdp else None  # FSDP shards `model` in place; the result goes here
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay, cfg.lr, lr_groups or {}), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.schedule))
    model, optimizer = acc.prepare(model, optimizer)
    tally = _Tally()
    acc.register_for_checkpointing(scheduler, tally)
    saved = state_dir / STATE_DIR
    old = saved.with_name(saved.name + ".old")
    if acc.is_main_process and not saved.is_dir() and old.is_dir():  # killed between the two renames of _save
        os.replace(old, saved)
    acc.wait_for_everyone()
    set_seed(seed)  # dropout and anything else random; a resumed run gets the saved RNG states back below
    resumed_from = 0
    if saved.is_dir():
        acc.load_state(str(saved))
        resumed_from = tally.step
        log.info("%s: resuming the training at step %d of %d", label, tally.step, cfg.steps)
    order = window_order(windows.shape[0], cfg.steps, cfg.batch_size, seed)
    log_every = max(1, cfg.steps // MAX_CURVE_POINTS)
    unwrapped = acc.unwrap_model(model)

    def evaluate(step: int) -> None:
        # under FSDP every process runs the forward (each layer's weights are gathered from all of them)
        if eval_windows is None or not (acc.is_main_process or fsdp):
            return
        unwrapped.eval()
        with _without_autocast(unwrapped):  # the weights as they will be written, not their bf16 view
            ppl = perplexity(unwrapped, eval_windows).ppl
        unwrapped.train()
        tally.evals.append({"step": step, "ppl": round(ppl, 6)})
        log.info("%s: step %d: perplexity %.4f on eval_data", label, step, ppl)

    if not tally.evals:
        evaluate(0)
    started, before = time.perf_counter(), tally.seconds  # `before`: the seconds of the steps already done
    with progress.track(f"{label}: training", cfg.steps) as task:
        task.advance(tally.step)
        while tally.step < cfg.steps:
            step = tally.step
            t0 = time.perf_counter()
            ids = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            totals: dict[str, float] = {}
            for m in range(cfg.grad_accum):
                micro = ids[m * per_micro: (m + 1) * per_micro][rank * local: (rank + 1) * local]
                with acc.accumulate(model):
                    loss, terms = loss_fn(model, micro, windows[micro].to(acc.device))
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": float(loss.detach()), **terms}.items():
                    totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            lrs = scheduler.get_last_lr()
            lr = float(lrs[0])
            others = {f"lr_{g['name']}": float(x) for g, x in zip(optimizer.param_groups, lrs) if g.get("name")}
            scheduler.step()
            tally.step += 1
            seconds = time.perf_counter() - t0
            tokens = cfg.batch_size * windows.shape[1]
            tally.tokens += tokens
            if world > 1:  # the mean over processes (each saw its share of the batch)
                t = torch.tensor(list(totals.values()), device=acc.device)
                totals = dict(zip(totals, (acc.reduce(t, reduction="mean")).tolist()))
            if tally.step % log_every == 0 or tally.step == cfg.steps:
                tally.curve.append({"step": tally.step, **{k: round(v, 6) for k, v in totals.items()},
                                    "lr": lr, **others, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)})
            task.advance()
            task.note(f"loss {totals['loss']:.4f}  lr {lr:.2e}  {tokens / max(seconds, 1e-9):,.0f} tok/s")
            if cfg.eval_every and tally.step % cfg.eval_every == 0 and tally.step < cfg.steps:
                evaluate(tally.step)
            if tally.step % cfg.save_every == 0 and tally.step < cfg.steps:
                tally.seconds = before + time.perf_counter() - started
                _save(acc, saved)
                crash_point("train.saved")
            crash_point("train.step")  # `train.step:N`: killed after step N, usually with steps lost since the save
    evaluate(cfg.steps)
    acc.wait_for_everyone()
    result = TrainResult(cfg.steps, resumed_from, tally.curve, tally.evals, seconds=before + time.perf_counter() - started,
                         tokens=tally.tokens, processes=world, sharded=fsdp)
    result.model = sharding.gather(acc, model, twin) if twin is not None else unwrapped
    acc.free_memory()  # drops the accelerator's references (DDP wrapper, optimizer) before the caller saves
    if twin is None:
        acc.unwrap_model(unwrapped, keep_fp32_wrapper=False)  # and mixed precision's autocast around forward
    del dist
    return result


@contextmanager
def _without_autocast(model: nn.Module) -> Iterator[None]:
    """Run `model` with its own forward: accelerate's mixed precision replaces model.forward by an autocast
    wrapper (keeping the original as _original_forward), which would measure a bf16 view of the weights on
    a GPU while the export holds them in float32."""
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original  # type: ignore[method-assign]
    try:
        yield
    finally:
        model.forward = wrapped  # type: ignore[method-assign]


def _save(acc: Any, saved: Path) -> None:
    """accelerate's full training state, into a temporary directory renamed over the previous one (under
    FSDP every process writes its shards of the model and optimizer there)."""
    tmp = saved.with_name(saved.name + ".tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    acc.wait_for_everyone()  # every process's files are in tmp before it becomes the checkpoint
    if acc.is_main_process:
        old = saved.with_name(saved.name + ".old")
        if saved.exists():
            os.replace(saved, old)
        os.replace(tmp, saved)
        if old.exists():
            shutil.rmtree(old)
    acc.wait_for_everyone()
