"""Numerically careful linear algebra shared by the methods: whitening from a Gram matrix, truncated SVD.

Whitening ("eigh", the default) uses `eigh` of the Gram in fp64 with eigenvalues clamped at a relative floor (a
plain Cholesky would throw on the rank-deficient Grams that few calibration tokens or dead channels produce).
"cholesky" is the fast alternative (a Cholesky costs ~1/9 of an eigh): G + δI with δ = floor · max diag(G),
δ raised tenfold until the factorisation succeeds. Clamped eigenvalues (eigh) or δ escalations (cholesky) are
counted and reported, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import torch
from pydantic import Field

DEFAULT_EIG_FLOOR = 1e-6  # relative to the largest eigenvalue


@dataclass
class Whitening:
    """G ≈ S Sᵀ with S = Q Λ^{1/2}; `inverse` = Λ^{-1/2} Qᵀ. Both (n, n) fp64."""

    S: torch.Tensor
    inverse: torch.Tensor
    clamped: int


WhiteningMethod = Annotated[Literal["eigh", "cholesky"],
                            Field(description="eigh (clamped eigenvalues) or cholesky (damped, faster)")]
WHITENINGS = get_args(get_args(WhiteningMethod)[0])


def symmetric_copy(gram: torch.Tensor, dtype=torch.float64, device=None, block: int = 1024) -> torch.Tensor:
    """A fresh `dtype` copy of a Gram with its two triangles averaged (accumulated sums are symmetric only up to
    rounding), made in place a block-row at a time: one n × n matrix where 0.5 * (g + g.T) holds three at once
    (a 70B down_proj's fp64 Gram is 6.6 GB). Bit for bit the same values."""
    g = gram.to(device=device, dtype=dtype, copy=True)
    n = g.shape[0]
    for i in range(0, n, block):
        rows, cols = g[i : i + block, i:], g[i:, i : i + block]
        avg = 0.5 * (rows + cols.T)
        rows.copy_(avg)
        cols.copy_(avg.T)
    return g


def whitening(gram: torch.Tensor, eig_floor: float = DEFAULT_EIG_FLOOR, method: str = "eigh",
              ridge: float = 0.0) -> Whitening:
    """`ridge` λ is added to the diagonal first (G + λI), in place on the working copy."""
    if method == "cholesky":
        return _cholesky_whitening(gram, eig_floor, ridge)
    if method != "eigh":
        raise ValueError(f"unknown whitening {method!r}; use one of {', '.join(WHITENINGS)}")
    g = _working_copy(gram, ridge)
    eigvals, Q = torch.linalg.eigh(g)
    del g
    top = eigvals.max().clamp(min=torch.finfo(torch.float64).tiny)
    floor = eig_floor * top
    clamped = int((eigvals < floor).sum())
    root = eigvals.clamp(min=floor).sqrt()
    inverse = Q.T / root[:, None]
    return Whitening(S=Q.mul_(root), inverse=inverse, clamped=clamped)


def _working_copy(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    g = symmetric_copy(gram)
    if ridge:
        g.diagonal().add_(ridge)
    return g


def _cholesky_whitening(gram: torch.Tensor, eig_floor: float, ridge: float) -> Whitening:
    """S = L with L Lᵀ = G + δI (lower triangular), inverse = L⁻¹ by a triangular solve in place on the identity.
    δ goes onto the working copy's diagonal in place."""
    g = _working_copy(gram, ridge)
    diagonal = g.diagonal()
    plain = diagonal.clone()
    delta = eig_floor * plain.max().clamp(min=torch.finfo(torch.float64).tiny)
    for escalations in range(12):
        diagonal.copy_(plain + delta)
        L, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            del g, diagonal
            eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
            inverse = torch.linalg.solve_triangular(L, eye, upper=False, out=eye)
            return Whitening(S=L, inverse=inverse, clamped=escalations)
        delta = delta * 10
    raise FloatingPointError("Gram matrix is not positive semi-definite even after damping by 1e+6 × its floor")


SVDSolver = Annotated[Literal["gram", "full", "randomized"],
                      Field(description="gram (eigh of the smaller Gram, fp64), full, or randomized")]
SVD_SOLVERS = get_args(get_args(SVDSolver)[0])


def truncated_svd(M: torch.Tensor, rank: int, solver: str = "gram", *, oversample: int = 16, power_iters: int = 2):
    """Top-`rank` SVD of M[..., m, n]: (U_r, s_r, Vh_r), batched over leading dimensions.

    solver:
      "gram"       eigh of the smaller Gram M Mᵀ (or Mᵀ M) in fp64, the other factor by one product. Squaring
                   loses accuracy only for σ below ~1e-8·σ_max, which truncation throws away; 2-3× faster than
                   an SVD on CPUs, and GPUs' batched eigh beats their SVD by more.
      "full"       torch.linalg.svd in M's dtype (LAPACK gesdd / cuSOLVER).
      "randomized" Halko–Martinsson–Tropp range finder with `oversample` extra columns and `power_iters`
                   QR-stabilised power iterations, fp64; approximate (scripts/bench_svd.py measures how much), pays
                   off when rank ≪ min(m, n).
    """
    if solver == "full":
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[..., :, :rank], s[..., :rank], Vh[..., :rank, :]
    if solver == "gram":
        return _gram_svd(M.to(torch.float64), rank)
    if solver == "randomized":
        return _randomized_svd(M.to(torch.float64), rank, oversample, power_iters)
    raise ValueError(f"unknown svd solver {solver!r}; use one of {', '.join(SVD_SOLVERS)}")


def top_of_gram(K: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` singular pairs of any M with M Mᵀ = K (K[..., m, m] fp64): (U, σ), σ descending."""
    eigvals, Q = torch.linalg.eigh(0.5 * (K + K.mT))
    # eigh sorts ascending
    return Q[..., :, -rank:].flip(-1), eigvals[..., -rank:].flip(-1).clamp(min=0).sqrt()


def _gram_svd(M: torch.Tensor, rank: int):
    wide = M.shape[-2] <= M.shape[-1]
    Q, s = top_of_gram(M @ M.mT if wide else M.mT @ M, rank)
    inv = safe_inverse(s)
    if wide:
        # scaled in place: the product is the largest temporary (a 70B gate/up pair's U: 2.3 GB in fp64)
        return Q, s, (M.mT @ Q).mul_(inv[..., None, :]).mT  # Vᵀ = Σ⁻¹ Uᵀ M
    return (M @ Q).mul_(inv[..., None, :]), s, Q.mT  # U = M V Σ⁻¹


def range_finder(M: torch.Tensor, cols: int, power_iters: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal Q[..., m, cols] whose span approximates M's top left singular subspace: `power_iters`
    QR-stabilised power iterations from `start` (a previous Q: warm start) or from M Ω for a Gaussian Ω."""
    if start is None:
        # One seeded test matrix shared by the batch: reproducible, and a batched call equals the per-matrix loop.
        generator = torch.Generator(device=M.device).manual_seed(0)
        omega = torch.randn(M.shape[-1], cols, dtype=M.dtype, device=M.device, generator=generator)
        start = torch.linalg.qr(M @ omega).Q
    Q = start
    for _ in range(power_iters):
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.mT @ Q).Q).Q
    return Q


def _randomized_svd(M: torch.Tensor, rank: int, oversample: int, power_iters: int):
    Q = range_finder(M, min(rank + oversample, *M.shape[-2:]), power_iters)
    U, s, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    return (Q @ U)[..., :, :rank], s[..., :rank], Vh[..., :rank, :]


def whitened_svd(M: torch.Tensor, rank: int, gram, whiten, solver: str = "gram"):
    """Top-`rank` SVD of M S for the whitening S Sᵀ ≈ G, as (U, s, P, clamped) with P = Vᵀ S⁻¹ (n columns, the
    whitening already undone: A = √s P). `gram()` gives G (n×n fp64, any ridge included); `whiten()` the
    Whitening, called only when it is needed.

    A wide M (m < n: down_proj, GQA's k/v, any EoRA residual of one) with the "gram" solver never factors G:
    (M S)(M S)ᵀ = M G Mᵀ is m×m, and Vᵀ S⁻¹ = Σ⁻¹ Uᵀ M S S⁻¹ = Σ⁻¹ Uᵀ M, so one product M G (m·n²) replaces
    the eigh of G (~9 n³ fp64, plus S and S⁻¹: n² each) and both products with S. It solves the objective
    for G itself, nothing clamped (clamping exists only to make S invertible); the eigh path's answer differs by
    the clamp, ≤ eig_floor of the top eigenvalue. At n = 8960 (Qwen2.5-1.5B's down_proj) this is ~20× less
    fp64 work and 2.6 GB less memory."""
    m, n = M.shape[-2:]
    if solver == "gram" and m < n:
        M = M.to(torch.float64)
        U, s = top_of_gram((M @ gram().to(M.device, torch.float64)) @ M.mT, rank)
        return U, s, (U.mT @ M).mul_(safe_inverse(s)[..., :, None]), 0
    white = whiten()
    U, s, Vh = truncated_svd(M @ white.S, rank, solver)
    return U, s, Vh.to(torch.float64) @ white.inverse, white.clamped


def safe_inverse(s: torch.Tensor) -> torch.Tensor:
    """1/σ, and 0 for σ ≈ 0: those components carry nothing (B = U√σ ≈ 0), so they get zero partners."""
    tiny = s[..., :1] * 1e-12 + torch.finfo(torch.float64).tiny
    return torch.where(s > tiny, 1.0 / s.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(s))


def split_factors(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor):
    """B = U √s, A = √s Vh: the singular values are shared so neither factor has a huge dynamic range."""
    root = s.sqrt()
    return U * root[..., None, :], root[..., :, None] * Vh
