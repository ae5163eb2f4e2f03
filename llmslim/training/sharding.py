"""FSDP for the training loop: accelerate's FSDP2, on GPUs and on CPU processes over gloo, and the trained
model gathered whole onto the main process.

`accelerate launch --use_fsdp --fsdp_version 2 ...` (or a config file from `accelerate config`) sets
ACCELERATE_USE_FSDP and the FSDP_* variables; accelerate builds its FSDP plugin from them. accelerate 1.15
switches to FSDP only for GPU-like backends (`AcceleratorState`: MULTI_GPU, MULTI_XPU, ...): processes on
CPUs (gloo) fall back to DDP without a word, with every weight replicated. torch's FSDP2 (`fully_shard`)
runs on CPU over gloo, so where accelerate left FSDP off `accelerator()` turns it on with the same
plugin: from then on the same accelerate code shards the model (`fsdp2_prepare_model`), clips, saves and
loads the sharded training state (torch.distributed.checkpoint) and gathers the full state dict
(`get_state_dict`) as on GPUs, which is how tests/test_distill.py tests it without a GPU.

After training the sharded module cannot be turned back into a plain one (FSDP2 rewrites its class and
parameters in place), so before sharding `skeleton` copies the module's structure with every parameter
and persistent buffer on the meta device (no memory), and `gather` loads the full state dict into it on the
main process: a plain model (peft adapters, fake-quant Linears and all) for the stage to merge and write.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from ..errors import UserError


def fsdp_requested() -> bool:
    """Whether accelerate's launch configuration asks for FSDP (`--use_fsdp`, or distributed_type FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def accelerator(**kwargs: Any) -> Any:
    """accelerate's Accelerator for one training stage, under FSDP2 whenever the launch asks for FSDP."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    # AcceleratorState is a process-wide singleton that refuses a second Accelerator with other settings
    # (e.g. a bf16 stage, then a float32 one, in one run); the process group (PartialState) stays
    AcceleratorState._reset_state()
    acc = Accelerator(**kwargs)
    state = acc.state
    on_cpu = (DistributedType.MULTI_CPU, DistributedType.FSDP)  # FSDP: switched on here for an earlier stage
    if fsdp_requested() and state.distributed_type in on_cpu and getattr(state, "fsdp_plugin", None) is None:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as accelerate does on GPUs
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        state.fsdp_plugin = plugin
        # both singletons: every AcceleratorState() accelerate creates copies PartialState's fields again
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise UserError("llmslim trains under FSDP2 only: set fsdp_version: 2 in accelerate's config "
                        "(or pass --fsdp_version 2 to accelerate launch)")
    return acc


def is_fsdp(acc: Any) -> bool:
    return bool(acc.is_fsdp2)


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and persistent buffers are on the meta device (what a state dict
    fills); non-persistent buffers (e.g. rotary frequencies, never in a state dict) are copied for real."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _tied(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (tied embeddings)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def gather(acc: Any, model: nn.Module, twin: nn.Module) -> nn.Module | None:
    """The trained FSDP `model` as a plain module on the main process's CPU: accelerate gathers the full
    state dict there (a collective, so every process calls it), loaded into `twin` (`skeleton`). None on
    the other processes."""
    tied = _tied(twin)
    state = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    twin.load_state_dict(state, assign=True)  # strict: every parameter and persistent buffer, full size
    for names in tied:  # assign=True gave each name its own tensor; tie them again
        shared = twin.get_parameter(names[0])
        for name in names[1:]:
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent), leaf, shared)
    return twin.to("cpu")  # the non-persistent buffers too (copied on the training device)
