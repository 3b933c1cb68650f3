"""FWSVD (Hsu et al., 2022): Fisher-weighted SVD.

Weights whose LM-loss gradients are large matter more. With I the diagonal Fisher of W collapsed to one
importance per row and d = √I, minimise ‖diag(d)(W − Ŵ)‖_F over rank r: SVD of diag(d)·W, keep r terms,
fold diag(d)⁻¹ back into the left factor: B = diag(d)⁻¹ U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_rᵀ. The weighted error
is then exactly √(Σ_{i>r} σᵢ²) of diag(d)·W (Eckart–Young), which `spectrum` hands to rank allocation.

Axis choice. The paper writes layers as y = x W (W: in × out) and sums the Fisher "along the row", i.e. over
the output features, giving one importance per INPUT feature. lrc's default `axis: out` is the other one: one
importance per torch row (output feature, summed over inputs), weighting the rows of W (out × in) —
diag(d)·W as above. `axis: in` is the paper's literal reading: one importance per input column (summed over
output rows), minimise ‖(W − Ŵ) diag(d)‖_F, fold diag(d)⁻¹ into the right factor A. Both Fisher sums are
collected in one pass (compressor/pipeline/fisher.py), so either axis costs the same.

Numerics: d is divided by its maximum (scaling d changes nothing) and floored at √floor (default floor 1e-6 of
the largest importance), so a row with zero gradient keeps a finite fold-back 1/d; the count of floored
importances is reported in the `clamped_eigenvalues` column. An all-zero Fisher (a module the loss never
reached) gives d ≡ 1: plain SVD, with every entry counted as clamped. Uniform I is plain SVD exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compressor.nn.factors import Decomposition, LowRank
from compressor.linalg import split_factors, truncated_svd
from compressor.budget.rank import RankOptions
from compressor.registry import register

FISHER_FLOOR = 1e-6  # relative to the largest importance


class FWSVDOptions(RankOptions):
    axis: Literal["out", "in"] = Field(
        "out", description="Fisher summed to one importance per output row ('out') or per input column ('in')"
    )
    floor: float = Field(FISHER_FLOOR, gt=0, lt=1, description="importance floor, relative to the largest")


def weights(W: torch.Tensor, stats, options: FWSVDOptions) -> tuple[torch.Tensor, int]:
    """d = √I, normalised and floored: (b, m) for axis out, (b, n) for axis in; fp64. Also the clamp count.

    `stats.fisher` / `stats.fisher_in` may be (k,) (shared by the whole batch) or (b, k) (one per matrix)."""
    importance = stats.fisher if options.axis == "out" else stats.fisher_in
    size = W.shape[-2] if options.axis == "out" else W.shape[-1]
    if importance is None:
        raise ValueError(f"fwsvd needs Fisher statistics (axis {options.axis}); collect them with compressor.pipeline.fisher")
    I = importance.to(device=W.device, dtype=torch.float64).clamp(min=0)
    I = I.expand(W.shape[0], size) if I.dim() == 1 else I
    if I.shape != (W.shape[0], size):
        raise ValueError(f"Fisher of shape {tuple(importance.shape)} does not fit weights {tuple(W.shape)}")
    top = I.amax(-1, keepdim=True)
    dead = top <= 0
    I = torch.where(dead, torch.ones_like(I), I / torch.where(dead, torch.ones_like(top), top))
    clamped = int((I < options.floor).sum()) + int(dead.sum()) * size
    return I.clamp(min=options.floor).sqrt(), clamped


def _weighted(W: torch.Tensor, d: torch.Tensor, axis: str) -> torch.Tensor:
    W = W.to(torch.float64)
    return d[..., :, None] * W if axis == "out" else W * d[..., None, :]


def spectrum(W: torch.Tensor, stats, options: FWSVDOptions) -> torch.Tensor:
    """Singular values of the Fisher-weighted W: the tail's squares are the weighted error at each rank."""
    d, _ = weights(W, stats, options)
    return torch.linalg.svdvals(_weighted(W, d, options.axis))


@register("fwsvd", needs=("fisher",), options=FWSVDOptions, factorizes=True,
          summary="Fisher-weighted SVD (squared LM-loss gradients)", spectrum=spectrum, spectrum_units="scaled")
def decompose(W: torch.Tensor, stats, options: FWSVDOptions, rank: int) -> Decomposition:
    """W: (b, m, n). ‖diag(d)(W − BA)‖_F (axis out) or ‖(W − BA)diag(d)‖_F (axis in) = √(Σ_{i>r} σᵢ²)."""
    d, clamped = weights(W, stats, options)
    U, s, Vh = truncated_svd(_weighted(W, d, options.axis), rank, options.svd_solver)
    B, A = split_factors(U, s, Vh)
    if options.axis == "out":
        B = B / d[..., :, None]
    else:
        A = A / d[..., None, :]
    return Decomposition([LowRank(A=a.float(), B=b.float()) for a, b in zip(A, B)], clamped_eigenvalues=clamped)
