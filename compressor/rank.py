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


class RankOptions(BaseModel):
    """Options shared by every factorising method: exactly one of `rank` or `param_ratio`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    exclusive_options: ClassVar = (("rank", "param_ratio"),)  # `--set rank=16` replaces a recipe's ratio

    rank: Optional[int] = Field(None, gt=0, description="fixed rank for every target")
    param_ratio: Optional[float] = Field(
        None, gt=0, le=1, description="fraction of each target's parameters to keep (0.8 = 20% removed)"
    )

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
