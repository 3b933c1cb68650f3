"""SVD-LLM: truncation-aware whitened SVD, optionally fitted to the dense model's outputs and ridge-regularised.

Plain SVD-LLM minimises the output error ‖(W − Ŵ)X‖_F over rank-r Ŵ for the calibration inputs X. With the Gram
G = X Xᵀ = S Sᵀ (S = Q Λ^{1/2} from eigh, small eigenvalues clamped), take W S = U Σ Vᵀ and keep r terms:
B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_rᵀ S⁻¹, so ‖(W − BA)X‖_F² = Σ_{i>r} σᵢ² exactly: the optimum for these X.

With sequential compressed inputs, layer i sees X̂ (what the already-compressed layers before it produce) while
the dense model saw X. Two options change the target, not the solver. Over rank-r Ŵ we minimise

    (1 − β)‖(W − Ŵ)X̂‖² + β‖W X − Ŵ X̂‖² + λ‖W − Ŵ‖²_F,    λ = δ·tr(Ĝ)/n  (n input features).

`beta` (β ∈ [0, 1]) shrinks towards fitting the dense outputs W X ("error-aware": the layer also undoes, as far
as a rank-r map can, the error its inputs already carry); β = 1 alone destroyed SmolLM2 (ppl 80 → 1377, docs/methods.md).
`ridge` (δ ≥ 0) keeps Ŵ near W in directions X̂ hardly visits. With Ĝ = X̂ X̂ᵀ, C = X X̂ᵀ (the "cross" statistic)
and C_β = Ĝ + β(C − Ĝ), the objective expands to tr(Ŵ(Ĝ + λI)Ŵᵀ) − 2 tr(W(C_β + λI)Ŵᵀ) + const
= ‖Ŵ S − W(C_β + λI)S⁻ᵀ‖² + const with S Sᵀ = Ĝ + λI: the truncated SVD of M = W(C_β + λI)S⁻ᵀ, then A = A′S⁻¹,
and Σ_{i>r} σᵢ(M)² is the objective's rank-dependent part (what `spectrum` gives rank allocation). β = δ = 0 is
plain SVD-LLM; with dense inputs C = Ĝ and β drops out. β > 0 costs one more forward per layer and a second
activation stream (compressor/pipeline/sequential.py).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from compressor.nn.factors import Decomposition, LowRank
from compressor.linalg import (DEFAULT_EIG_FLOOR, WhiteningMethod, safe_inverse, split_factors, symmetric_copy,
                              top_of_gram, truncated_svd, whitened_svd)
from compressor.budget.rank import RankOptions
from compressor.registry import register


class SVDLLMOptions(RankOptions):
    eig_floor: float = Field(DEFAULT_EIG_FLOOR, gt=0, lt=1, description="eigenvalue clamp, relative to the largest")
    whitening: WhiteningMethod = "eigh"
    beta: float = Field(0.0, ge=0, le=1, description="weight of fitting the dense outputs W·X from the compressed "
                                                     "inputs X̂ (0: fit W·X̂; needs sequential.inputs: compressed to "
                                                     "matter); 1 hurts real LLMs, see docs/methods.md")
    ridge: float = Field(0.0, ge=0, description="δ: adds λ‖W − Ŵ‖²_F with λ = δ·tr(Ĝ)/n (keeps Ŵ near W)")

    @field_validator("beta", "ridge", mode="before")
    @classmethod
    def _a_number(cls, value):  # `beta: true` (the old `error_aware: true`) must not pass as 1.0 silently
        if isinstance(value, bool):
            raise ValueError("a number, not true/false")
        return value


def _ridged_gram(stats, ridge: float) -> torch.Tensor:
    gram = stats.gram.to(torch.float64)
    if not ridge:
        return gram
    lam = ridge * gram.diagonal().sum() / gram.shape[-1]
    ridged = gram.clone()  # one n × n copy; gram + λ·eye(n) held three
    ridged.diagonal().add_(lam)
    return ridged


def _need_cross(stats) -> None:
    if stats.cross is None:
        raise ValueError("svd-llm with beta > 0 needs the cross statistic Σ x x̂ᵀ (collect 'cross')")


def _whitened_target(W: torch.Tensor, stats, options: SVDLLMOptions):
    """(the matrix whose truncated SVD is the answer, the whitening), for β > 0 with two streams."""
    _need_cross(stats)
    white = stats.whitening(options.eig_floor, options.whitening, ridge=options.ridge)
    W = W.to(torch.float64)
    # S Sᵀ = Ĝ + λI + Δ, Δ what clamping (or damping) added. Putting the same Δ into the cross term adds the
    # regulariser tr((W − Ŵ) Δ (W − Ŵ)ᵀ), and with identical streams (C = Ĝ) gives exactly the β = 0 answer:
    # C_β + λI + Δ = S Sᵀ + β(C − Ĝ), so M = W S + β W (C − Ĝ) S⁻ᵀ.
    cross = stats.cross.to(device=W.device, dtype=torch.float64)
    gram = stats.gram.to(device=W.device, dtype=torch.float64)
    return W @ (white.S + options.beta * (cross - gram) @ white.inverse.mT), white


def _wide_target_svd(W: torch.Tensor, stats, options: SVDLLMOptions, rank: int):
    """β > 0 and m < n (down_proj, GQA's k/v): the SVD of M = Y S⁻ᵀ, Y = W(C_β + λI), through the m × m matrix
    M Mᵀ = Y (Ĝ + λI)⁻¹ Yᵀ, and Vᵀ S⁻¹ = Σ⁻¹ Uᵀ Y (Ĝ + λI)⁻¹: one Cholesky solve with Ĝ + λI instead of its eigh
    (~9 n³ fp64 flops: most of a 7B lowrank layer's time) and no n × n whitening pair or target (four n × n fp64
    at once: ~4 GB for a 7B down_proj, ~26 GB for a 70B one). It solves the objective for Ĝ + λI itself; the eigh
    path differs by what it clamps (eigenvalues below eig_floor·λ_max). None when Ĝ + λI is not positive definite
    (no ridge, a rank-deficient Gram): the caller then whitens, clamps and counts."""
    _need_cross(stats)
    W = W.to(torch.float64)
    beta = options.beta
    gram = stats.gram.to(W.device, torch.float64)
    ridged = symmetric_copy(gram)
    lam = float(options.ridge * ridged.diagonal().sum() / ridged.shape[-1]) if options.ridge else 0.0
    ridged.diagonal().add_(lam)
    # Y = W((1 − β)Ĝ + βC + λI) = (1 − β)·W(Ĝ + λI) + β·W C + βλ·W
    Y = (W @ ridged).mul_(1 - beta).add_(W @ stats.cross.to(W.device, torch.float64), alpha=beta)
    if lam:
        Y.add_(W, alpha=beta * lam)
    L, info = torch.linalg.cholesky_ex(ridged)
    del ridged
    if int(info) != 0:
        return None
    X = torch.cholesky_solve(Y.mT, L)  # (Ĝ + λI)⁻¹ Yᵀ
    del L
    U, s = top_of_gram(Y @ X, rank)
    return U, s, (U.mT @ X.mT).mul_(safe_inverse(s)[..., :, None]), 0


def _solve(W: torch.Tensor, stats, options: SVDLLMOptions, rank: int):
    """(U, s, P, clamped): the top-`rank` SVD of the whitened target, P its right factor with S⁻¹ applied."""
    if options.beta == 0 or stats.cross is stats.gram:  # one stream (dense inputs): C = Ĝ, β drops out
        return whitened_svd(W.to(torch.float64), rank, lambda: _ridged_gram(stats, options.ridge),
                            lambda: stats.whitening(options.eig_floor, options.whitening, ridge=options.ridge),
                            options.svd_solver)
    m, n = W.shape[-2:]
    if options.svd_solver == "gram" and m < n:
        solved = _wide_target_svd(W, stats, options, rank)
        if solved is not None:
            return solved
    M, white = _whitened_target(W, stats, options)
    U, s, Vh = truncated_svd(M, rank, options.svd_solver)
    return U, s, Vh.to(torch.float64) @ white.inverse, white.clamped


def spectrum(W: torch.Tensor, stats, options) -> torch.Tensor:
    """Singular values of the whitened target: the tail's squares are the objective's rank-dependent part."""
    return _solve(W, stats, options.model_copy(update={"svd_solver": "gram"}), min(W.shape[-2:]))[1]


@register("svd-llm", needs=("gram",), options=SVDLLMOptions, factorizes=True, summary="whitened truncation-aware SVD",
          spectrum=spectrum, spectrum_units="output",
          extra_needs=lambda options: ("cross",) if options.beta > 0 else ())
def decompose(W: torch.Tensor, stats, options: SVDLLMOptions, rank: int) -> Decomposition:
    U, s, P, clamped = _solve(W, stats, options, rank)
    B, A = split_factors(U, s, P)
    return Decomposition([LowRank(A=a.float(), B=b.float()) for a, b in zip(A, B)],
                         clamped_eigenvalues=clamped * W.shape[0])
