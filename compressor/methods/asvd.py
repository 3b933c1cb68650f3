"""ASVD (Yuan et al., 2023): activation-aware SVD.

Input channels with large activations matter more to the output, so scale column j of W by
s_j = (mean_t |x_tj|)^α before truncating: W diag(s) ≈ U_r Σ_r V_rᵀ, then fold diag(s)⁻¹ back into the right
factor, A = Σ_r^{1/2} V_rᵀ diag(s)⁻¹, B = U_r Σ_r^{1/2}. α = 0.5 is the paper's default; α = 0 (or equal
channel means) is plain SVD.

Numerics: the means are divided by their maximum (W diag(c s) and diag(c s)⁻¹ cancel, so this changes nothing
but the range) and floored at 1e-6 of it, so a dead channel (mean 0) gets s_j = (1e-6)^α instead of 0 and the
fold-back 1/s_j stays finite; that channel's weights are then almost ignored by the truncation, which is right
for an input that was never seen. An all-zero statistic gives s ≡ 1 (plain SVD).

The paper also searches per-layer ratios by calibration perplexity; lrc's rank allocation replaces that.
"""

from __future__ import annotations

import torch
from pydantic import Field

from compressor.nn.factors import Decomposition, LowRank
from compressor.linalg import split_factors, truncated_svd
from compressor.budget.rank import RankOptions
from compressor.registry import register

ABS_MEAN_FLOOR = 1e-6  # relative to the largest channel mean


class ASVDOptions(RankOptions):
    alpha: float = Field(0.5, ge=0, le=2, description="exponent of the per-channel mean |x| scaling (0: plain SVD)")


def channel_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = (mean|x_j| / max)^α with the mean floored at ABS_MEAN_FLOOR · max; fp64, in (0, 1]."""
    a = abs_mean.to(torch.float64)
    top = a.max()
    if not top > 0:
        return torch.ones_like(a)
    return (a / top).clamp(min=ABS_MEAN_FLOOR).pow(alpha)


def spectrum(W: torch.Tensor, stats, options: ASVDOptions) -> torch.Tensor:
    """Singular values of W·diag(s): ASVD's own (scaled) error at each rank, for rank allocation."""
    s = channel_scales(stats.abs_mean, options.alpha).to(device=W.device, dtype=torch.float32)
    return torch.linalg.svdvals(W.to(torch.float32) * s)


@register("asvd", needs=("abs_mean",), options=ASVDOptions, factorizes=True,
          summary="activation-aware (mean |x|) scaled SVD", spectrum=spectrum, spectrum_units="scaled")
def decompose(W: torch.Tensor, stats, options: ASVDOptions, rank: int) -> Decomposition:
    """W: (b, m, n) same-shape weights sharing one input (so one set of channel scales)."""
    s = channel_scales(stats.abs_mean, options.alpha).to(device=W.device, dtype=torch.float32)
    U, sv, Vh = truncated_svd(W.to(torch.float32) * s, rank, options.svd_solver)
    B, A = split_factors(U, sv, Vh)
    A = A / s
    return Decomposition([LowRank(A=a.float(), B=b.float()) for a, b in zip(A, B)])
