"""SVD-LLM: truncation-aware whitened SVD.

Minimises the output error ‖(W − Ŵ)X‖_F over rank r for the calibration inputs X. With the Gram G = X Xᵀ
= S Sᵀ (S = Q Λ^{1/2} from eigh, small eigenvalues clamped), take W S = U Σ Vᵀ and keep r terms:
B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_rᵀ S⁻¹, so ‖(W − BA)X‖_F² = Σ_{i>r} σᵢ² exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field

from compressor.factors import Decomposition, LowRank
from compressor.linalg import DEFAULT_EIG_FLOOR, WhiteningMethod, split_factors, truncated_svd
from compressor.rank import RankOptions
from compressor.registry import register


class SVDLLMOptions(RankOptions):
    eig_floor: float = Field(DEFAULT_EIG_FLOOR, gt=0, lt=1, description="eigenvalue clamp, relative to the largest")
    whitening: WhiteningMethod = "eigh"


def spectrum(W: torch.Tensor, stats, options) -> torch.Tensor:
    """Singular values of W·S: the tail's squares are the output error on the calibration inputs."""
    return torch.linalg.svdvals(W.to(torch.float64) @ stats.whitening(options.eig_floor, options.whitening).S)


@register("svd-llm", needs=("gram",), options=SVDLLMOptions, factorizes=True, summary="whitened truncation-aware SVD",
          spectrum=spectrum)
def decompose(W: torch.Tensor, stats, options: SVDLLMOptions, rank: int) -> Decomposition:
    white = stats.whitening(options.eig_floor, options.whitening)
    M = W.to(torch.float64) @ white.S
    U, s, Vh = truncated_svd(M, rank, options.svd_solver)
    B, A = split_factors(U, s, Vh)
    A = A @ white.inverse
    return Decomposition(
        [LowRank(A=a.float(), B=b.float()) for a, b in zip(A, B)], clamped_eigenvalues=white.clamped * W.shape[0]
    )
