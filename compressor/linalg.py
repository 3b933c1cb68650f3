"""Numerically careful linear algebra shared by the methods: whitening from a Gram matrix, truncated SVD.

Whitening uses `eigh` of the Gram in fp64 with eigenvalues clamped at a relative floor (a Cholesky would throw
on the rank-deficient Grams that few calibration tokens or dead channels produce). Clamps are counted and
reported, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_EIG_FLOOR = 1e-6  # relative to the largest eigenvalue


@dataclass
class Whitening:
    """G ≈ S Sᵀ with S = Q Λ^{1/2}; `inverse` = Λ^{-1/2} Qᵀ. Both (n, n) fp64."""

    S: torch.Tensor
    inverse: torch.Tensor
    clamped: int


def whitening(gram: torch.Tensor, eig_floor: float = DEFAULT_EIG_FLOOR) -> Whitening:
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)  # accumulated sums are symmetric only up to rounding
    eigvals, Q = torch.linalg.eigh(g)
    top = eigvals.max().clamp(min=torch.finfo(torch.float64).tiny)
    floor = eig_floor * top
    clamped = int((eigvals < floor).sum())
    root = eigvals.clamp(min=floor).sqrt()
    return Whitening(S=Q * root, inverse=Q.T / root[:, None], clamped=clamped)


def truncated_svd(M: torch.Tensor, rank: int):
    """Top-`rank` SVD of M[..., m, n] in fp32 or fp64 (as given). Returns U_r, s_r, Vh_r and the full spectrum."""
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[..., :, :rank], s[..., :rank], Vh[..., :rank, :], s


def split_factors(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor):
    """B = U √s, A = √s Vh: the singular values are shared so neither factor has a huge dynamic range."""
    root = s.sqrt()
    return U * root[..., None, :], root[..., :, None] * Vh
