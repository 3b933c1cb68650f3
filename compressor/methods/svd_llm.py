"""SVD-LLM: truncation-aware whitened SVD, optionally error-aware.

Minimises the output error ‖(W − Ŵ)X‖_F over rank r for the calibration inputs X. With the Gram G = X Xᵀ
= S Sᵀ (S = Q Λ^{1/2} from eigh, small eigenvalues clamped), take W S = U Σ Vᵀ and keep r terms:
B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_rᵀ S⁻¹, so ‖(W − BA)X‖_F² = Σ_{i>r} σᵢ² exactly. That is the optimum for
these X, so no least-squares re-fit of a factor on the same X can improve it.

`error_aware: true` changes the target, not the solver. With sequential compressed inputs, layer i sees X̂ (what
the already-compressed layers before it produce) while the dense model saw X. Minimise ‖W X − Ŵ X̂‖_F instead:
with Ĝ = X̂ X̂ᵀ = S Sᵀ and C = X X̂ᵀ (the "cross" statistic), this is the whitened problem above for
W* = W C Ĝ⁻¹ with Ĝ as the Gram, so the SVD is of W* S = W C S⁻ᵀ and ‖W X − BA X̂‖_F² = Σ_{i>r} σᵢ² + const
(the part of W X that no linear map of X̂ reaches; clamped directions: see `_whitened_target`). The layer thus
also undoes, as far as a rank-r map can, the error its inputs already carry. With dense inputs C = Ĝ and it is
plain SVD-LLM. Costs one more forward per layer and a second activation stream (compressor/sequential.py).
Experimental: it is the per-layer optimum, yet on SmolLM2-135M at 20% removed it raised perplexity from 80 to
~1400 (README, "Error-aware SVD-LLM"); the default stays off.
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
    error_aware: bool = Field(False, description="experimental: fit the dense model's outputs W·X from the compressed "
                                                 "model's inputs X̂ (differs only with sequential.inputs: compressed); "
                                                 "hurts real LLMs, see README")


def _whitened_target(W: torch.Tensor, stats, options: SVDLLMOptions):
    """(the matrix whose truncated SVD is the answer, the whitening)."""
    white = stats.whitening(options.eig_floor, options.whitening)
    W = W.to(torch.float64)
    if not options.error_aware or stats.cross is stats.gram:  # one stream (dense inputs): C = Ĝ, plain SVD-LLM
        return W @ white.S, white
    if stats.cross is None:
        raise ValueError("error-aware svd-llm needs the cross statistic Σ x x̂ᵀ (collect 'cross')")
    cross = stats.cross.to(device=W.device, dtype=torch.float64)
    # S Sᵀ is Ĝ plus what clamping (or damping) added, Δ. Adding the same Δ to C makes the regulariser
    # tr((W − Ŵ) Δ (W − Ŵ)ᵀ): in directions X̂ hardly visits Ŵ stays near W (as plain SVD-LLM does), and with
    # identical streams (C = Ĝ) the result is exactly plain SVD-LLM's.
    gram = stats.gram.to(device=W.device, dtype=torch.float64)
    cross = cross + (white.S @ white.S.mT - gram)
    return W @ cross @ white.inverse.mT, white  # W C S⁻ᵀ = (W C (S Sᵀ)⁻¹) S


def spectrum(W: torch.Tensor, stats, options) -> torch.Tensor:
    """Singular values of the whitened target: the tail's squares are the output error on the calibration inputs."""
    return torch.linalg.svdvals(_whitened_target(W, stats, options)[0])


@register("svd-llm", needs=("gram",), options=SVDLLMOptions, factorizes=True, summary="whitened truncation-aware SVD",
          spectrum=spectrum, extra_needs=lambda options: ("cross",) if options.error_aware else ())
def decompose(W: torch.Tensor, stats, options: SVDLLMOptions, rank: int) -> Decomposition:
    M, white = _whitened_target(W, stats, options)
    U, s, Vh = truncated_svd(M, rank, options.svd_solver)
    B, A = split_factors(U, s, Vh)
    A = A @ white.inverse
    return Decomposition(
        [LowRank(A=a.float(), B=b.float()) for a, b in zip(A, B)], clamped_eigenvalues=white.clamped * W.shape[0]
    )
