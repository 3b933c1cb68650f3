"""Truncated SVD: W ≈ U_r Σ_r V_rᵀ, the Frobenius-optimal rank-r approximation (Eckart–Young)."""

from __future__ import annotations

import torch

from compressor.nn.factors import Decomposition, LowRank
from compressor.linalg import split_factors, truncated_svd
from compressor.budget.rank import RankOptions
from compressor.registry import register


class SVDOptions(RankOptions):
    pass


def spectrum(W: torch.Tensor, stats, options) -> torch.Tensor:
    return torch.linalg.svdvals(W.to(torch.float32))


@register("svd", needs=(), options=SVDOptions, factorizes=True, summary="truncated SVD of the weight",
          spectrum=spectrum, spectrum_units="weight")
def decompose(W: torch.Tensor, stats, options: SVDOptions, rank: int) -> Decomposition:
    """W: (b, m, n) same-shape weights. Error ‖W − BA‖_F = √(Σ_{i>r} σᵢ²)."""
    U, s, Vh = truncated_svd(W.to(torch.float32), rank, options.svd_solver)
    B, A = split_factors(U, s, Vh)
    return Decomposition([LowRank(A=a.float(), B=b.float()) for a, b in zip(A, B)])
