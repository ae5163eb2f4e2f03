"""Quantized Linear weights in compressed-tensors format: vLLM's native quantized checkpoint format,
also read by transformers (which decompresses it to dense weights).

Integer convention (shared with the GPTQ/RTN cores): a quantized Linear weight [out, in] is
    q      [out, in]        int8, signed, in [-2^(b-1), 2^(b-1) - 1]
    scale  [out, n_groups]  float
    zero   [out, n_groups]  int8, same signed range (all 0 when symmetric)
    g_idx  [in] int32 or None: group of each input column (act-order with groups only)
    w = (q - zero[:, g]) * scale[:, g]   with g = g_idx, or column // group_size, or 0 (per channel)

Everything on disk is produced by compressed-tensors itself: `QuantScheme` becomes its
`QuantizationScheme`, its format is what the library infers for a Linear with that scheme, the tensors
come out of that format's compressor (`pack-quantized`: int4 etc. packed into int32 by
`pack_to_int32`; `int-quantized`: int8), and the config block is its `QuantizationConfig`, serialised
the way its `ModelCompressor.update_config` does. What gets written, per module `name`:

    pack-quantized (weight-only, 2..8 bits)      int-quantized (W8A8, bits 8, activation_bits 8)
    name.weight_packed      int32 [out, ceil(in / (32 // b))]   name.weight        int8 [out, in]
    name.weight_scale       dtype [out, n_groups]               name.weight_scale  dtype [out, 1]
    name.weight_shape       int64 [2] = (out, in)
    name.weight_zero_point  int32 [ceil(out / (32 // b)), n_groups]  (asymmetric only)
    name.weight_g_idx       int32 [in]                          (actorder="group" only)

Bit-exactness: transformers decompresses in the scale's in-memory dtype, which is the model's dtype
(it casts the stored scale to it): w = (q.to(dt) - zero.to(dt)) * scale.to(dt), one rounding.
`loaded_weight` computes exactly that tensor, so a model holding `loaded_weight(...)` in memory gives
the same logits (and perplexity) as the export reloaded by transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
ACTORDERS = (None, "group", "weight")


@dataclass(frozen=True)
class QuantScheme:
    """How every targeted Linear is quantized.

    bits: weight bits (2..8). group_size: input columns sharing one scale; -1 = one scale per output
    channel. symmetric: zero points all 0 (not stored). activation_bits: 8 = W8A8 int8 (dynamic
    per-token symmetric activation quantization at inference; needs bits=8, symmetric, per channel),
    None = weight-only (W{bits}A16). actorder: "group" stores a g_idx per Linear (GPTQ act-order with
    groups formed in activation order; transformers reads it, vLLM >= 0.3x refuses it); "weight"
    records that act-order ran with static (column-order) groups: no g_idx, every loader reads it.
    """

    bits: int
    group_size: int = -1
    symmetric: bool = True
    activation_bits: int | None = None
    actorder: str | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {self.group_size}")
        if self.activation_bits not in (None, 8):
            raise ValueError(f"activation_bits must be None or 8, got {self.activation_bits}")
        if self.activation_bits is not None and (self.bits != 8 or not self.symmetric or self.group_size != -1):
            raise ValueError("W8A8 int8 needs bits=8, symmetric=True, group_size=-1 (what vLLM's int8 kernels run)")
        if self.actorder not in ACTORDERS:
            raise ValueError(f"actorder must be one of {ACTORDERS}, got {self.actorder!r}")
        if self.actorder == "group" and self.group_size == -1:
            raise ValueError('actorder="group" needs group_size > 0 (per-channel act-order needs no g_idx)')

    @property
    def strategy(self) -> str:
        """compressed-tensors weight strategy: "channel" or "group"."""
        return "channel" if self.group_size == -1 else "group"

    @property
    def format(self) -> str:
        """The compressed-tensors format the library picks for a Linear with this scheme:
        "pack-quantized" (weight-only) or "int-quantized" (W8A8)."""
        from compressed_tensors.compressors.format import infer_module_format

        return infer_module_format(torch.nn.Linear, self.to_compressed_tensors()).value

    def to_compressed_tensors(self, targets: tuple[str, ...] | list[str] = ("Linear",)) -> Any:
        """This scheme as a `compressed_tensors.quantization.QuantizationScheme`."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric,
                                   strategy=self.strategy, dynamic=False,
                                   group_size=None if self.group_size == -1 else self.group_size,
                                   actorder=self.actorder)
        inputs = None
        if self.activation_bits is not None:
            inputs = QuantizationArgs(num_bits=self.activation_bits, type="int", symmetric=True,
                                      strategy="token", dynamic=True)
        return QuantizationScheme(targets=list(targets), weights=weights, input_activations=inputs)


def quantization_config(scheme: QuantScheme, *, ignore: list[str], targets: tuple[str, ...] = ("Linear",)) -> dict:
    """The `quantization_config` entry of config.json: one config group applying `scheme` to modules
    matching `targets` (class names or "re:" regexes), except those in `ignore` (e.g. ["lm_head"]).
    Built from compressed-tensors' QuantizationConfig and laid out as its ModelCompressor writes it."""
    return quantization_config_groups([(scheme, tuple(targets))], ignore=ignore)


def quantization_config_groups(groups: list[tuple[QuantScheme, tuple[str, ...]]], *, ignore: list[str]) -> dict:
    """`quantization_config` with one config group per (scheme, targets); the targets of different groups
    must not overlap (e.g. a per-channel group for the Linears a group size does not fit)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    config_groups = {}
    for i, (scheme, targets) in enumerate(groups):
        ct_scheme = scheme.to_compressed_tensors(targets)
        ct_scheme.format = scheme.format
        config_groups[f"group_{i}"] = ct_scheme
    formats = sorted({s.format for s, _ in groups})
    config = QuantizationConfig(config_groups=config_groups, format=formats[0] if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=list(ignore))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {},
            **config.model_dump(mode="json", exclude={"quant_method"})}


def _groups(g_idx: Tensor | None, columns: int, group_size: int) -> Tensor:
    """Group index of each input column, [in] int64."""
    if g_idx is not None:
        return g_idx.long()
    if group_size == -1:
        return torch.zeros(columns, dtype=torch.long)
    return torch.arange(columns) // group_size


def _check_inputs(q: Tensor, scale: Tensor, zero: Tensor | None, g_idx: Tensor | None, scheme: QuantScheme) -> None:
    out, columns = q.shape
    lo, hi = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"q outside [{lo}, {hi}] for {scheme.bits} bits")
    n_groups = 1 if scheme.group_size == -1 else math.ceil(columns / scheme.group_size)
    if scheme.group_size != -1 and columns % scheme.group_size:
        raise ValueError(f"in_features {columns} is not a multiple of group_size {scheme.group_size}")
    if tuple(scale.shape) != (out, n_groups):
        raise ValueError(f"scale has shape {list(scale.shape)}, expected {[out, n_groups]}")
    if zero is not None:
        if tuple(zero.shape) != (out, n_groups):
            raise ValueError(f"zero has shape {list(zero.shape)}, expected {[out, n_groups]}")
        if scheme.symmetric and bool(zero.any()):
            raise ValueError("symmetric scheme but zero points are not all 0")
        if zero.numel() and (int(zero.min()) < lo or int(zero.max()) > hi):
            raise ValueError(f"zero points outside [{lo}, {hi}] for {scheme.bits} bits")
    elif not scheme.symmetric:
        raise ValueError("asymmetric scheme needs zero points")
    if g_idx is not None:
        if tuple(g_idx.shape) != (columns,):
            raise ValueError(f"g_idx has shape {list(g_idx.shape)}, expected {[columns]}")
        # compressed-tensors (and GPTQ) regroup columns by sorting g_idx: every group must hold
        # exactly group_size columns.
        counts = torch.bincount(g_idx.long(), minlength=n_groups)
        if len(counts) != n_groups or bool((counts != scheme.group_size).any()):
            raise ValueError(f"g_idx must assign exactly group_size={scheme.group_size} columns to each of {n_groups} groups")


def _is_trivial(g_idx: Tensor, group_size: int) -> bool:
    return bool(torch.equal(g_idx.long(), torch.arange(len(g_idx)) // group_size))


def compress_linear(name: str, q: Tensor, scale: Tensor, zero: Tensor | None, g_idx: Tensor | None,
                    scheme: QuantScheme, *, dtype: torch.dtype) -> dict[str, Tensor]:
    """The checkpoint tensors for the quantized Linear `name` (e.g. "model.layers.0.mlp.down_proj").

    Scales are stored in `dtype` (the checkpoint's dtype). A g_idx equal to column // group_size is
    dropped (it is the default order); any other g_idx needs scheme.actorder == "group". The bias,
    if any, is not included: it stays `name.bias` in the checkpoint dtype. Tensors come out of the
    compressed-tensors compressor for scheme.format; raises if they do not reproduce `q` exactly."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    q = q.detach().cpu()
    scale = scale.detach().cpu()
    zero = None if zero is None else zero.detach().cpu().to(torch.int8)
    g_idx = None if g_idx is None else g_idx.detach().cpu().to(torch.int32)
    _check_inputs(q, scale, zero, g_idx, scheme)
    if g_idx is not None and (scheme.group_size == -1 or _is_trivial(g_idx, scheme.group_size)):
        g_idx = None
    if g_idx is not None and scheme.actorder != "group":
        raise ValueError(f"{name}: a non-trivial g_idx needs QuantScheme(actorder='group')")
    if scheme.actorder == "group" and g_idx is None:  # the loader expects the tensor
        g_idx = (torch.arange(q.shape[1]) // scheme.group_size).to(torch.int32)

    scale = scale.to(dtype).contiguous()
    if zero is None:
        zero = torch.zeros(scale.shape, dtype=torch.int8)
    # The compressors quantize a float weight with the given scale/zero: hand them the float32
    # dequantized weight, from which round(w / s) + z gives back q exactly (|q - z| <= 255, so the
    # relative float32 error of w / s, ~1e-7, never moves it across a rounding boundary).
    local: dict[str, Tensor] = {"weight": dequantize_reference(q, scale, zero, g_idx, dtype=torch.float32),
                                "weight_scale": scale, "weight_zero_point": zero}
    if g_idx is not None:
        local["weight_g_idx"] = g_idx
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    packed = compressor.compress(local, scheme.to_compressed_tensors())

    if "weight_packed" in packed:
        stored_q = unpack_from_int32(packed["weight_packed"], scheme.bits, q.shape)
    else:
        stored_q = packed["weight"]
    if not torch.equal(stored_q, q):
        raise RuntimeError(f"{name}: compressed-tensors did not reproduce q exactly (a bug)")
    return {f"{name}.{key}": t.contiguous() for key, t in packed.items()}


def decompress_linear(name: str, tensors: dict[str, Tensor], scheme: QuantScheme) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `compress_linear` (without g_idx): (q int8 [out, in], scale [out, n_groups] as stored,
    zero int8 [out, n_groups]) of the Linear `name` from its checkpoint tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scale = tensors[f"{name}.weight_scale"]
    if f"{name}.weight_packed" in tensors:
        shape = tuple(int(x) for x in tensors[f"{name}.weight_shape"].tolist())
        q = unpack_from_int32(tensors[f"{name}.weight_packed"], scheme.bits, shape)
    else:
        q = tensors[f"{name}.weight"]
    zero = torch.zeros(scale.shape, dtype=torch.int8)
    if f"{name}.weight_zero_point" in tensors:
        zp = tensors[f"{name}.weight_zero_point"]
        zero = (unpack_from_int32(zp, scheme.bits, tuple(scale.shape), packed_dim=0) if scheme.format == "pack-quantized"
                else zp).to(torch.int8)
    return q.to(torch.int8), scale, zero


def scheme_of(name: str, qconfig: dict) -> QuantScheme:
    """The scheme of quantized Linear `name` in a config.json `quantization_config`: the group whose `re:`
    target matches the name, else the one targeting the class "Linear"."""
    import re

    groups = list((qconfig.get("config_groups") or {}).values())
    match = next((g for g in groups if any(t.startswith("re:") and re.match(t[3:], name) for t in g["targets"])),
                 None) or next((g for g in groups if "Linear" in g["targets"]), None)
    if match is None:
        raise ValueError(f"{name}: no quantization_config group targets it")
    w, a = match["weights"], match.get("input_activations") or {}
    return QuantScheme(w["num_bits"], w.get("group_size") or -1, w["symmetric"], a.get("num_bits"),
                       w.get("actorder"))


def stored_shapes(out: int, columns: int, scheme: QuantScheme, has_g_idx: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a quantized Linear [out, columns] has on disk under `scheme` (the table in
    this module's docstring): what the export check holds each stored tensor to."""
    groups = 1 if scheme.group_size == -1 else math.ceil(columns / scheme.group_size)
    if scheme.format == "int-quantized":
        shapes: dict[str, tuple[int, ...]] = {"weight": (out, columns), "weight_scale": (out, groups)}
        if not scheme.symmetric:
            shapes["weight_zero_point"] = (out, groups)
    else:
        per_int = 32 // scheme.bits
        shapes = {"weight_packed": (out, math.ceil(columns / per_int)), "weight_scale": (out, groups),
                  "weight_shape": (2,)}
        if not scheme.symmetric:
            shapes["weight_zero_point"] = (math.ceil(out / per_int), groups)
    if has_g_idx:
        shapes["weight_g_idx"] = (columns,)
    return shapes


def densify(tensors: dict[str, Tensor], qconfig: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    """Checkpoint tensors with every compressed Linear replaced by its dense `weight` in `dtype`, computed as
    transformers computes it for a model loaded in `dtype` (scale cast to dtype, then (q - z) * s): our
    own decoding of an export, independent of transformers', to check it against."""
    bases = sorted({n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale")})
    out = dict(tensors)
    for base in bases:
        scheme = scheme_of(base, qconfig)
        q, scale, zero = decompress_linear(base, tensors, scheme)
        g_idx = tensors.get(f"{base}.weight_g_idx")
        for key in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"):
            out.pop(f"{base}.{key}", None)
        out[f"{base}.weight"] = dequantize_reference(q, scale.to(dtype), zero, g_idx, dtype=dtype)
    return out


def dequantize_reference(q: Tensor, scale: Tensor, zero: Tensor | None, g_idx: Tensor | None = None,
                         *, dtype: torch.dtype = torch.float32) -> Tensor:
    """w = (q - zero[:, g]) * scale[:, g], computed and returned in `dtype`: [out, in].

    g is g_idx when given, else column // group_size, with group_size = in / n_groups (n_groups = 1:
    per channel). With `dtype` = the dtype the loader holds the scale in, this is also bit for bit
    what compressed-tensors' decompression computes (see loaded_weight)."""
    out, columns = q.shape
    n_groups = scale.shape[1]
    groups = _groups(g_idx, columns, -1 if n_groups == 1 else columns // n_groups)
    s = scale.to(dtype)[:, groups]
    w = q.to(dtype)
    if zero is not None:
        w = w - zero.to(dtype)[:, groups]
    return w * s


def loaded_weight(q: Tensor, scale: Tensor, zero: Tensor | None, g_idx: Tensor | None = None, *,
                  dtype: torch.dtype, model_dtype: torch.dtype) -> Tensor:
    """Bit for bit the dense weight transformers holds after loading the export written by
    `compress_linear(..., dtype=dtype)` into a model of `model_dtype` (from_pretrained(dtype=...)).

    The scale is stored in `dtype`, transformers casts it to `model_dtype` on load, and
    compressed-tensors decompresses in that dtype: (q - z) * s, one rounding to `model_dtype`."""
    s = scale.to(dtype).to(model_dtype)
    return dequantize_reference(q, s, zero, g_idx, dtype=model_dtype)


def quantize_activations(x: Tensor, bits: int = 8) -> Tensor:
    """Dynamic per-token symmetric fake quantization as vLLM's int8 kernels do it (CPU: s = max|x| / 127
    per row, q = round_half_even(x * (1 / s)) clamped to int8; the GPU kernel is the same up to float
    rounding): returns q * s in x's dtype."""
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / qmax
    return (torch.clamp(torch.round(xf * (1.0 / s)), -qmax - 1, qmax) * s).to(x.dtype)


class _Emulation:
    """Handle returned per hooked module: .remove() undoes the hook and restores the module."""

    def __init__(self, module: Any, hook: Any, had_flag: bool, flag: Any) -> None:
        self.module, self.hook, self.had_flag, self.flag = module, hook, had_flag, flag

    def remove(self) -> None:
        self.hook.remove()
        if self.had_flag:
            self.module.quantization_enabled = self.flag
        elif "quantization_enabled" in vars(self.module):
            delattr(self.module, "quantization_enabled")


def emulate_activation_quant(model: torch.nn.Module, bits: int = 8, *, ignore: tuple[str, ...] = ("lm_head",),
                             only: set[str] | None = None) -> list[_Emulation]:
    """Make a transformers model compute like vLLM's W8A8 int8 path: a forward pre-hook fake-quantizes
    the input of every quantized Linear with `quantize_activations` (dynamic, per token, symmetric).

    Why: vLLM quantizes activations with s = max|x| / 127. transformers' compressed-tensors
    integration (0.17) also fake-quantizes W8A8 inputs, but with s = max|x| / 127.5 (and per tensor for
    2-D inputs), and a dense in-memory model does not quantize them at all; either way greedy tokens
    can differ from vLLM's. On modules loaded from a W8A8 export the library's own input quantization
    is switched off (`quantization_enabled = False`) so only this one applies.

    Quantized Linears: those carrying a compressed-tensors scheme with input activations (a model
    loaded from a W8A8 export); in a model without any scheme attached (the in-memory model before
    export), the nn.Linears named in `only` when given, else every one whose name's last part is not in
    `ignore`. Returns one handle per hooked
    module; .remove() on each undoes it."""
    schemes = {n: getattr(m, "quantization_scheme", None) for n, m in model.named_modules()}
    has_schemes = any(s is not None for s in schemes.values())

    def pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
        return (quantize_activations(args[0], bits), *args[1:])

    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if has_schemes:
            scheme = schemes[name]
            if scheme is None or scheme.input_activations is None:
                continue
        elif (name not in only) if only is not None else (name.rsplit(".", 1)[-1] in ignore):
            continue
        had_flag = "quantization_enabled" in vars(module)
        flag = vars(module).get("quantization_enabled")
        if has_schemes:
            wrapped: Any = module
            wrapped.quantization_enabled = False  # read by compressed-tensors' wrapped forward
        handles.append(_Emulation(module, module.register_forward_pre_hook(pre_hook), had_flag, flag))
    return handles
