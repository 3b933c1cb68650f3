"""Rank <-> parameter maths. Ranks are decided here, never inside a method.

A rank-r factorisation of an m x n matrix stores r(m + n) numbers instead of m n; "keep a fraction p of the
parameters" means r = floor(p m n / (m + n)). Factoring only pays when r(m + n) < m n: otherwise the target is
skipped (left dense) and the report says why.

Bytes (`size_ratio`): the stored bytes of the factors relative to the same matrix stored dense in the output's
dtype (`dense_bits` per weight: 16 for bf16/fp16, 32 for fp32). Factors in the output dtype cost r(m + n)·bytes,
so there size_ratio = param_ratio; with `factor_bits` b (8 or 4) each factor is b-bit codes plus fp16 scales and
packed zero points per group (compressor/methods/factor_quant.py), and the rank is the largest whose exact
stored bytes (`factor_bytes`) fit — about 16/b times more rank for the same bytes. Biases are stored dense either
way and are not part of the rank choice.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor import quant
from compressor.linalg import SVDSolver




class RankOptions(BaseModel):
    """Options shared by every factorising method: exactly one of `rank`, `param_ratio` or `size_ratio`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # `--set rank=16` replaces a recipe's ratio
    exclusive_options: ClassVar = (("rank", "param_ratio", "size_ratio"),)

    rank: Optional[int] = Field(None, gt=0, description="fixed rank for every target")
    param_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="fraction of each target's parameters to keep (0.8 = 20% removed)"
    )
    size_ratio: Optional[float] = Field(
        None, gt=0, lt=1, description="fraction of each target's dense bytes (in the output dtype) to store"
    )
    factor_bits: Optional[Literal[4, 8]] = Field(
        None, description="store both factors as 8- or 4-bit codes (None: in the output dtype)"
    )
    factor_group_size: Optional[int] = Field(
        128, gt=0, description="`factor_bits`: input columns per scale of each factor (None: one per row)"
    )
    dense_bits: Optional[Literal[16, 32]] = Field(
        None, description="bits of one dense weight in the output dtype, for `size_ratio` (the pipeline sets it "
                          "from the checkpoint's dtype; 16 when unknown)"
    )
    rank_multiple: Optional[int] = Field(
        None, gt=0, description="round every rank down to a multiple of this (8 for CPU GEMMs, 64 for GPU tensor "
                                "cores): never over the budget; a rank below it is kept as is"
    )
    svd_solver: SVDSolver = "gram"  # see compressor.linalg.truncated_svd

    @model_validator(mode="after")
    def _exactly_one(self):
        if sum(v is not None for v in (self.rank, self.param_ratio, self.size_ratio)) != 1:
            raise ValueError("set exactly one of 'rank', 'param_ratio' or 'size_ratio'")
        return self


def rank_for_ratio(m: int, n: int, param_ratio: float) -> int:
    # Exact rational arithmetic: float floor-division loses a rank where p·m·n/(m+n) is an integer.
    return max(1, math.floor(Fraction(repr(float(param_ratio))) * m * n / (m + n)))


def saves_parameters(m: int, n: int, rank: int) -> bool:
    return rank * (m + n) < m * n


def factor_bytes(m: int, n: int, rank: int, factor_bits: int | None, group_size: int | None,
                 element_size: int) -> int:
    """Exact stored bytes of rank-r factors A (r, n), B (m, r): in the output dtype, or as packed `factor_bits`
    codes with one fp16 scale and one packed zero point per group (compressor.quant's format)."""
    if factor_bits is None:
        return rank * (m + n) * element_size
    return packed_bytes(rank, n, factor_bits, group_size) + packed_bytes(m, rank, factor_bits, group_size)


def packed_bytes(rows: int, cols: int, bits: int, group_size: int | None) -> int:
    """Bytes of a (rows, cols) matrix in compressor.quant's packed format: b-bit codes and zero points packed into
    int32 words per row, one fp16 scale per group of `group_size` columns (None: one group per row)."""
    groups = quant.num_groups(cols, cols if group_size is None else group_size)
    words = quant.packed_words(cols, bits) + quant.packed_words(groups, bits)
    return rows * (4 * words + 2 * groups)


def rank_for_size(m: int, n: int, size_ratio: float, factor_bits: int | None, group_size: int | None,
                  element_size: int) -> int:
    """Largest rank ≤ min(m, n) whose factors' bytes are ≤ size_ratio × the dense m·n weights' (0: none fits)."""
    budget = Fraction(repr(float(size_ratio))) * m * n * element_size
    lo, hi = 0, min(m, n)  # factor_bytes grows with the rank: bisect for the last one within the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if factor_bytes(m, n, mid, factor_bits, group_size, element_size) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def resolve_rank(m: int, n: int, options: RankOptions) -> tuple[int | None, str]:
    """(rank, "") for a target that should be factored, or (None, reason) for one that must stay dense.

    Factors in the output dtype must save parameters (r(m + n) < m n); quantised factors must save bytes."""
    bits, group = getattr(options, "factor_bits", None), getattr(options, "factor_group_size", 128)
    element_size = (getattr(options, "dense_bits", None) or 16) // 8
    if getattr(options, "size_ratio", None) is not None:
        rank = rank_for_size(m, n, options.size_ratio, bits, group, element_size)
        if rank == 0:
            return None, f"no rank fits size_ratio {options.size_ratio} of {m}×{n}; kept dense"
    else:
        rank = options.rank if options.rank is not None else rank_for_ratio(m, n, options.param_ratio)
    rank = round_rank(rank, getattr(options, "rank_multiple", None))
    if bits is None and not saves_parameters(m, n, rank):
        return None, f"rank {rank} would store {rank * (m + n):,} >= {m * n:,} parameters; kept dense"
    if bits is not None:
        rank = min(rank, m, n)
        stored, dense = factor_bytes(m, n, rank, bits, group, element_size), m * n * element_size
        if stored >= dense:
            return None, f"rank {rank} in {bits}-bit factors would store {stored:,} >= {dense:,} bytes; kept dense"
    return rank, ""


def round_rank(rank: int | None, multiple: int | None) -> int | None:
    """`rank` rounded down to a multiple of `multiple` (aligned GEMM shapes; fewer parameters, so within any budget
    the unrounded rank met); ranks below `multiple`, and None, unchanged."""
    if rank is None or not multiple or rank < multiple:
        return rank
    return rank - rank % multiple


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
    units across modules — compressor/budget/allocation.py weighs them by the loss first for `weight: loss`).
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
