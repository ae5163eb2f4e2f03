"""Recipe parameters of `sparsegpt` and `wanda` (the methods: methods/sparsity/)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import MethodConfig
from .gptq import check_patterns


def parse_structure(structure: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M): N weights zeroed in every M consecutive inputs of a row.
    Raises ValueError (one line) for anything else, or N >= M."""
    if structure == "unstructured":
        return None
    parts = structure.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"structure {structure!r}: use unstructured or \"N:M\" with integers, e.g. \"2:4\"")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise ValueError(f"structure {structure!r}: N:M zeroes N of every M consecutive inputs; it needs "
                         "0 < N < M (e.g. \"2:4\", \"4:8\")")
    return n, m


class SparsityFields(MethodConfig):
    """Parameters shared by sparsegpt and wanda: how many weights, in which pattern, which Linears."""

    data: str
    """Calibration source (from `data:`): the inputs that weigh each weight's importance."""
    sparsity: float | list[float] = 0.5
    """The fraction of each Linear's weights set to zero, in [0, 1); or one fraction per decoder layer.
    With an N:M `structure` the fraction is N/M: leave it out, or give that value."""
    structure: str = "unstructured"
    """unstructured (any weights of a row), or "N:M": N zeros in every M consecutive input columns of each
    row (e.g. "2:4", "4:8"; the input width of every pruned Linear must be divisible by M)."""
    ignore: list[str] = ["lm_head"]
    """Linear modules to leave dense, as gptq's `ignore`: a name suffix (`down_proj`,
    `model.layers.0.mlp.down_proj`) or `re:` plus a regex matched against the whole name. Embeddings,
    lm_head and norms are never pruned."""
    profile: Literal["uniform", "owl"] = "uniform"
    """How the sparsity is spread over the decoder layers: uniform (`sparsity` in every layer, or the
    per-layer list), or owl (Outlier Weighed Layerwise sparsity, Yin et al. 2024): layers with more
    outlier weights (Wanda score above `owl_threshold` x their layer's mean) are pruned less, each layer
    within `owl_lambda` of `sparsity`, their mean weighted by prunable weights equal to `sparsity`;
    unstructured and one fraction only. The chosen sparsities are in the stage notes."""
    owl_threshold: float = Field(default=5.0, gt=0)
    """profile owl: a weight is an outlier when its Wanda score |W_ij| x ||X_j|| exceeds this multiple of
    the mean score of its decoder layer (the paper's M)."""
    owl_lambda: float = Field(default=0.08, ge=0, lt=1)
    """profile owl: the largest deviation of a layer's sparsity from `sparsity` (the paper's lambda); the
    layer with the most (or fewest) outliers sits exactly this far from it."""

    @model_validator(mode="after")
    def _check(self) -> SparsityFields:
        nm = parse_structure(self.structure)
        values = self.sparsity if isinstance(self.sparsity, list) else [self.sparsity]
        if not values:
            raise ValueError("sparsity: give a fraction in [0, 1) or one per decoder layer, not an empty list")
        for v in values:
            if not 0 <= v < 1:
                raise ValueError(f"sparsity {v:g} is outside [0, 1): it is the fraction of weights set to zero")
        if nm is not None and "sparsity" in self.model_fields_set:
            if any(abs(v - nm[0] / nm[1]) > 1e-9 for v in values):
                raise ValueError(f"structure {self.structure!r} sets the sparsity to {nm[0]}/{nm[1]} = "
                                 f"{nm[0] / nm[1]:g}; leave sparsity out or give that value")
        check_patterns([(f"ignore[{i}]", p) for i, p in enumerate(self.ignore)])
        self._check_profile(nm)
        return self

    def _check_profile(self, nm: tuple[int, int] | None) -> None:
        if self.profile == "uniform":
            given = sorted({"owl_threshold", "owl_lambda"} & self.model_fields_set)
            if given:
                raise ValueError(f"{given[0]} applies to profile: owl only; add profile: owl or leave it out")
            return
        # the checks name the field, as `profile: owl` is what conflicts with it
        if nm is not None:
            raise ValueError(f"structure {self.structure!r}: profile owl varies the sparsity per layer, which "
                             "N:M fixes at N/M everywhere; use unstructured, or profile: uniform")
        if isinstance(self.sparsity, list):
            raise ValueError("sparsity: profile owl chooses each layer's sparsity itself around one target; give "
                             "one fraction, or profile: uniform for an explicit per-layer list")
        lo, hi = self.sparsity - self.owl_lambda, self.sparsity + self.owl_lambda
        if lo < 0 or hi >= 1:
            raise ValueError(f"owl_lambda {self.owl_lambda:g}: layers would range over [{lo:g}, {hi:g}] around "
                             f"sparsity {self.sparsity:g}, outside [0, 1); use a smaller owl_lambda")

    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M structure, None when unstructured."""
        return parse_structure(self.structure)

    def layer_sparsity(self, index: int) -> float:
        """The target fraction of zeros in decoder layer `index`."""
        nm = self.nm()
        if nm is not None:
            return nm[0] / nm[1]
        return self.sparsity[index] if isinstance(self.sparsity, list) else self.sparsity


class SparseGptConfig(SparsityFields):
    """SparseGPT (Frantar & Alistarh 2023): each Linear pruned column block by column block, the weights to
    zero chosen by their OBS cost w²/[H⁻¹]ᵢᵢ (the inverse over the columns not yet visited) and the error of
    each zeroed weight compensated on those columns through the inverse Hessian of the layer's real inputs
    (H = 2XᵀX), as GPTQ compensates rounding. Decoder layer by decoder layer, as gptq: each layer is
    calibrated on what the pruned layers before it produce. The export is dense, with the zeros in place."""

    dampening: float = Field(default=0.01, ge=0, lt=1)
    """Added to the Hessian's diagonal, as a fraction of its mean (raised x10 if H is still singular)."""
    block_size: int = Field(default=128, gt=0)
    """Columns per block: the unstructured mask is chosen per block of columns (adaptive mask selection),
    rounded to a multiple of M for N:M."""


class WandaConfig(SparsityFields):
    """Wanda (Sun et al. 2023): each weight scored |W_ij| x ||X_j||₂ (its magnitude times the norm of its
    input over the calibration tokens), the lowest scores of each output row set to zero; no weight update.
    Decoder layer by decoder layer, as gptq. The export is dense, with the zeros in place."""
