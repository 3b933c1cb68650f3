"""Rank <-> parameter maths. Ranks are decided here, never inside a method.

A rank-r factorisation of an m x n matrix stores r(m + n) numbers instead of m n; "keep a fraction p of the
parameters" means r = floor(p m n / (m + n)). Factoring only pays when r(m + n) < m n: otherwise the target is
skipped (left dense) and the report says why.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.linalg import SVDSolver




class RankOptions(BaseModel):
    """Options shared by every factorising method: exactly one of `rank` or `param_ratio`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    exclusive_options: ClassVar = (("rank", "param_ratio"),)  # `--set rank=16` replaces a recipe's ratio

    rank: Optional[int] = Field(None, gt=0, description="fixed rank for every target")
    param_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="fraction of each target's parameters to keep (0.8 = 20% removed)"
    )
    svd_solver: SVDSolver = "gram"  # see compressor.linalg.truncated_svd

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.rank is None) == (self.param_ratio is None):
            raise ValueError("set exactly one of 'rank' or 'param_ratio'")
        return self


def rank_for_ratio(m: int, n: int, param_ratio: float) -> int:
    # Exact rational arithmetic: float floor-division loses a rank where p·m·n/(m+n) is an integer.
    return max(1, math.floor(Fraction(repr(float(param_ratio))) * m * n / (m + n)))


def saves_parameters(m: int, n: int, rank: int) -> bool:
    return rank * (m + n) < m * n


def resolve_rank(m: int, n: int, options: RankOptions) -> tuple[int | None, str]:
    """(rank, "") for a target that should be factored, or (None, reason) for one that must stay dense."""
    rank = options.rank if options.rank is not None else rank_for_ratio(m, n, options.param_ratio)
    if not saves_parameters(m, n, rank):
        return None, f"rank {rank} would store {rank * (m + n):,} >= {m * n:,} parameters; kept dense"
    return rank, ""


# ---- Rank allocation across modules (recipe field `allocation`) ------------------------------------------


def max_rank(m: int, n: int) -> int:
    """Largest rank that still saves parameters: r(m + n) < m n."""
    return (m * n - 1) // (m + n)


def allocate_energy(spectra: dict, shapes: dict, energy: float) -> dict:
    """Per module, the smallest rank keeping `energy` of the (whitened) spectral energy Σσ²; a module whose
    rank would not save parameters stays dense (None)."""
    ranks = {}
    for name, s in spectra.items():
        e = s.double().pow(2)
        cumulative = e.cumsum(0) / e.sum().clamp(min=1e-300)
        rank = int((cumulative < energy).sum()) + 1
        ranks[name] = rank if rank <= max_rank(*shapes[name]) else None
    return ranks


def allocate_global(spectra: dict, shapes: dict, budget: int, *, weight: str = "relative", min_rank: int = 1) -> dict:
    """Choose every module's rank to minimise Σ_k w_k Σ_{i>r_k} σ_{k,i}² subject to Σ_k r_k (m_k + n_k) ≤ budget.

    Each module's error falls by w σ_i² for its i-th singular value at a cost of (m + n) parameters; σ is sorted,
    so taking items in order of w σ² / (m + n) while they fit is the greedy optimum for this separable problem
    (up to the last item at the budget edge). A module never exceeds max_rank (it would grow the layer).
    `weight`: "relative" (w = 1/Σσ², errors relative to ‖W X‖²) or "raw" (w = 1; spectra must then be in the same
    units across modules — compressor/allocation.py weighs them by the loss first for `weight: loss`).
    """
    if weight not in ("relative", "raw"):
        raise ValueError(f"unknown allocation weight {weight!r}; allocate_global takes 'relative' or 'raw'")
    names = list(spectra)
    ranks = {name: min(min_rank, max_rank(*shapes[name])) for name in names}
    spent = sum(ranks[name] * sum(shapes[name]) for name in names)
    if spent > budget:
        raise ValueError(f"budget {budget:,} is below the per-module floor of rank {min_rank} ({spent:,})")
    gains, owners, positions = [], [], []
    for k, name in enumerate(names):
        s2 = spectra[name].double().pow(2)
        w = 1.0 / s2.sum().clamp(min=1e-300) if weight == "relative" else 1.0
        top = max_rank(*shapes[name])
        idx = range(ranks[name], min(top, s2.numel()))
        for i in idx:
            gains.append(float(w * s2[i]) / sum(shapes[name]))
            owners.append(k)
            positions.append(i)
    import torch

    order = torch.argsort(torch.tensor(gains, dtype=torch.float64), descending=True, stable=True).tolist()
    for j in order:
        name = names[owners[j]]
        cost = sum(shapes[name])
        if positions[j] == ranks[name] and spent + cost <= budget:  # prefix order within a module is kept
            ranks[name] += 1
            spent += cost
    return ranks


def predicted_relative_error(spectrum, rank: int) -> float:
    """‖(W − Ŵ)X‖_F / ‖W X‖_F predicted from the whitened spectrum (exact for whitened truncation, dense inputs)."""
    e = spectrum.double().pow(2)
    return float((e[rank:].sum() / e.sum().clamp(min=1e-300)).sqrt())
