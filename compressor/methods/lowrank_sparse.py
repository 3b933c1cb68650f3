"""Low-rank + sparse (OATS-style): W ≈ L + S with L of rank r and S holding k non-zeros.

Outlier-aware: the columns are first scaled by the root-mean-square of their input channel,
d = √(diag(G)/N) (a channel that never fires is floored at `channel_floor`·max d, so the unscaling stays finite),
W' = W diag(d). Then alternate, starting from S = 0, for `iterations` rounds:
    L ← rank-r truncated SVD of (W' − S)                 (optimal L for fixed S, Eckart–Young)
    S ← the k largest-|·| entries of (W' − L), per row or in total, zero elsewhere   (optimal S for fixed L)
Each half step minimises ‖W' − L − S‖_F over one block, so the objective never increases (`alternate` can
record it). Finally unscale: W ≈ L diag(d)⁻¹ + S diag(d)⁻¹.

Budget in bytes (`size_ratio` q, what recipe `lowrank-sparse-50` sets): the stored bytes — factors, sparse values
and the sparse part's positions — are at most q × the dense m·n weights' bytes D = q·m·n·e (e bytes per weight
in the output dtype, `dense_bits`/8). `rank_fraction` of D goes to the low-rank part, the rest to S:
    r = ⌊rank_fraction · D / (e (m + n))⌋,   k = the most entries whose values and positions fit in D − r(m+n)e,
positions stored in whichever `sparse_format` is smaller for that k: a bitmask (m·⌈n/8⌉ bytes, whatever k) or
int16/int32 indices (2 bytes per entry in row mode) — the bitmask wins once S keeps more than 1/16 of the
entries, as here. Budget in values (`param_ratio` p, the papers' count; positions not counted):
    r = ⌊rank_fraction · p m n / (m + n)⌋,   k = ⌊p m n⌋ − r (m + n)   (k_row = ⌊k / m⌋ in `row` mode),
stored in the smaller format too (so its bytes are ≈ (p + 1/(8e))× the dense bytes, not p×).
rank_fraction = 1 means "no sparse part" (k = 0, plain d-scaled SVD); rank_fraction = 0 means no low-rank part
(S alone = per-row |W|·‖x‖ pruning, i.e. Wanda). The method computes r and k itself from these options, so it
registers with factorizes=False (the pipeline must not resolve a rank for it).

Default rank_fraction 0.3 (measured, relative output error ‖(W−Ŵ)X‖/‖WX‖ at param_ratio 0.5, 256×192, correlated
inputs with log-normal channel scales): W = low rank + Student-t(2) noise: rf 0 / 0.1 / 0.2 / 0.3 / 0.4 / 0.5 / 0.7
/ 1 → 0.063 / 0.059 / 0.053 / 0.044 / 0.040 / 0.040 / 0.049 / 0.145 (svd-llm 0.051); W i.i.d. Gaussian (no structure for
the low-rank part): 0.079 / 0.079 / 0.084 / 0.086 / 0.091 / 0.099 / 0.118 / 0.227 (svd-llm 0.080). 0.3 is the
compromise: near the best on structured weights, within 10% of pure pruning on unstructured ones.
Iterations default 40: the alternation converges slowly (same example, error after 1 / 5 / 10 / 20 / 40 / 80 / 160
rounds: 0.066 / 0.055 / 0.051 / 0.048 / 0.045 / 0.042 / 0.040); 80 buys ~6% less error for twice the SVDs.

Cost (`svd`): `full` takes one full SVD of the m×n residual per round, O(m·n·min(m, n)) — 40 of them per target
is hours per 7B layer on a CPU (a 7B lowrank-sparse-50 layer did not finish in 3000 s of one thread). `subspace`
(the default) only needs the top r: the residual changes a little from round to round, so each round refines the
previous round's subspace Q (r + `oversample` columns) by `power_steps` QR-stabilised power steps on the new
residual, O(m·n·r) each, then takes the top r by Rayleigh–Ritz on span[Q, U_prev] (U_prev: the last round's
rank-r left factor). Because that span contains U_prev, the new L is at least as good as U_prev U_prevᵀ(W' − S),
which is at least as good as the last L: the objective still never increases. The first round starts from a
seeded Gaussian range finder with `power_steps` + 2 steps. A single round (no sparse part, or no rounds to
amortise over) and ranks whose subspace would reach half of min(m, n) take the full SVD, exact.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compressor.linalg import range_finder, truncated_svd
from compressor.nn.factors import Decomposition, LowRankSparse, sparse_format_bytes
from compressor.registry import register


class LowRankSparseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    exclusive_options: ClassVar = (("param_ratio", "size_ratio"),)

    param_ratio: Optional[float] = Field(None, description="fraction of each target's m·n values kept (low rank + "
                                                           "sparse; 0.5 when neither ratio is set)")
    size_ratio: Optional[float] = Field(None, gt=0, lt=1, description="fraction of each target's dense bytes stored "
                                                                      "(factors + sparse values + positions)")
    sparse_format: Literal["auto", "bitmask", "indices"] = Field(
        "auto", description="how S's positions are stored: the smaller of the two (auto), or one of them")
    dense_bits: Optional[Literal[16, 32]] = Field(
        None, description="bits of one dense weight in the output dtype (the pipeline sets it; 16 when unknown)")
    rank_fraction: float = Field(0.3, ge=0, le=1, description="share of the kept budget given to the low-rank part")
    iterations: int = Field(40, ge=1, le=10_000, description="alternating rounds (one SVD each)")
    sparsity_per: Literal["row", "total"] = Field("row", description="keep k/m entries in every row, or k overall")
    channel_floor: float = Field(1e-6, gt=0, lt=1, description="floor of the channel scales, relative to the largest")
    svd: Literal["subspace", "full"] = Field(
        "subspace", description="each round's rank-r truncation: a warm-started subspace iteration, O(m·n·r) "
                                "(never increases the objective), or a full SVD, O(m·n·min(m, n))")
    power_steps: int = Field(2, ge=1, le=50, description="subspace: power steps per round (+2 in the first)")
    oversample: int = Field(64, ge=0, le=1024, description="subspace: extra columns carried beyond the rank")

    @field_validator("param_ratio")
    @classmethod
    def _saves(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < 1:
            raise ValueError(
                f"param_ratio must be in (0, 1), got {value}: low rank + sparse stores r(m+n) + k values and "
                "cannot save anything at param_ratio >= 1"
            )
        return value

    @model_validator(mode="after")
    def _one_ratio(self):
        if self.param_ratio is not None and self.size_ratio is not None:
            raise ValueError("set one of 'param_ratio' or 'size_ratio'")
        return self


def _fit_entries(room: int, m: int, n: int, e: int, fmt: str, per_row: bool) -> int:
    """The most sparse entries whose values (e bytes each) and positions fit in `room` bytes (row mode: a multiple
    of m)."""
    step = m if per_row else 1
    if fmt == "bitmask":
        k = max(room - sparse_format_bytes("bitmask", m, n, 0, per_row), 0) // e
    else:
        k = room // (e + sparse_format_bytes("indices", m, n, 1, per_row))
    return min((k // step) * step, m * n)


def sparse_format(options: LowRankSparseOptions, m: int, n: int, k: int, per_row: bool) -> str:
    if options.sparse_format != "auto":
        return options.sparse_format
    sizes = {fmt: sparse_format_bytes(fmt, m, n, k, per_row) for fmt in ("indices", "bitmask")}
    return min(sizes, key=lambda fmt: (sizes[fmt], fmt != "indices"))  # a tie keeps indices


def budget(m: int, n: int, options: LowRankSparseOptions) -> tuple[int, int]:
    """(rank r, sparse entries k) for an m×n target. In `row` mode k is a multiple of m (k_row per row)."""
    per_row = options.sparsity_per == "row"
    if options.size_ratio is not None:
        e = (options.dense_bits or 16) // 8
        room = math.floor(Fraction(repr(float(options.size_ratio))) * m * n * e)
        rank = min(math.floor(Fraction(repr(float(options.rank_fraction))) * room / (e * (m + n))), m, n)
        if options.rank_fraction == 1:
            return rank, 0
        room -= rank * (m + n) * e
        fits = {fmt: _fit_entries(room, m, n, e, fmt, per_row) for fmt in ("indices", "bitmask")}
        if options.sparse_format != "auto":
            return rank, fits[options.sparse_format]
        return rank, max(fits.values())
    kept = math.floor(Fraction(repr(float(options.param_ratio or 0.5))) * m * n)
    rank = math.floor(Fraction(repr(float(options.rank_fraction))) * kept / (m + n))
    rank = min(rank, m, n)
    k = 0 if options.rank_fraction == 1 else kept - rank * (m + n)
    if per_row:
        k = (k // m) * m
    return rank, k


def channel_scales(stats, n: int, floor: float) -> torch.Tensor:
    """d = √(diag(G)/N), (n,) fp64, with zero/tiny channels floored at `floor`·max d (all ones without data)."""
    d = (stats.gram.diagonal().to(torch.float64) / max(stats.count, 1)).clamp(min=0).sqrt()
    top = d.max() if d.numel() else d.new_tensor(0.0)
    if not torch.isfinite(top) or top <= 0:
        return torch.ones(n, dtype=torch.float64, device=stats.gram.device)
    return d.clamp(min=floor * top)


def hard_threshold(R: torch.Tensor, k: int, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest-|·| entries of R[b, m, n]: (S dense, indices). Row mode: indices (b, m, k/m) column indices;
    total mode: (b, k) flat indices into m·n."""
    b, m, n = R.shape
    if per_row:
        idx = R.abs().topk(k // m, dim=-1, sorted=False).indices
        return torch.zeros_like(R).scatter_(-1, idx, R.gather(-1, idx)), idx
    flat = R.reshape(b, m * n)
    idx = flat.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(flat).scatter_(-1, idx, flat.gather(-1, idx)).reshape(b, m, n), idx


class _Subspace:
    """Rank-r truncations of a slowly changing matrix: warm-started subspace iteration (module docstring)."""

    def __init__(self, rank: int, power_steps: int, oversample: int):
        self.rank, self.steps, self.oversample = rank, power_steps, oversample
        self.Q = self.U = None

    def __call__(self, M: torch.Tensor):
        cols = min(self.rank + self.oversample, *M.shape[-2:])
        # the first round starts cold: two more power steps than a warm-started one
        steps = self.steps if self.Q is not None else self.steps + 2
        Q = self.Q = range_finder(M, cols, steps, start=self.Q)
        span = Q if self.U is None else torch.linalg.qr(torch.cat([Q, self.U], dim=-1)).Q
        # Rayleigh–Ritz: the top r of the small (2r + oversample) × n projection, by the eigh of its Gram in fp64
        U, s, Vh = truncated_svd(span.mT @ M, self.rank, "gram")
        U, s, Vh = (span @ U.to(M.dtype)), s.to(M.dtype), Vh.to(M.dtype)
        self.U = U
        return U, s, Vh


def alternate(Wp: torch.Tensor, rank: int, k: int, iterations: int, per_row: bool = True, record: bool = False,
              svd: str = "subspace", power_steps: int = 2, oversample: int = 64):
    """OATS alternation on the scaled W'[b, m, n] (computed in Wp's dtype).

    Returns (U√s, √s Vh, S, indices, objective) where objective[t] = ‖W' − L − S‖_F (per matrix, shape (b,))
    after round t when `record` (else an empty list)."""
    S = torch.zeros_like(Wp)
    idx = None
    objective = []
    one_round = not k or iterations == 1
    if svd == "full" or one_round or 2 * (rank + oversample) >= min(Wp.shape[-2:]):
        truncate = lambda M: truncated_svd(M, rank, "full")  # noqa: E731
    else:
        truncate = _Subspace(rank, power_steps, oversample)
    for _ in range(iterations):
        if rank:
            U, s, Vh = truncate(Wp - S)
            L = (U * s[..., None, :]) @ Vh
        else:
            L = torch.zeros_like(Wp)
        if k:
            S, idx = hard_threshold(Wp - L, k, per_row)
        if record:
            objective.append(torch.linalg.matrix_norm(Wp - L - S))
        if not k or not rank:
            break  # one block is empty: a single round is already optimal, more change nothing
    if rank:
        root = s.sqrt()
        B, A = U * root[..., None, :], root[..., :, None] * Vh
    else:
        B, A = Wp.new_zeros(*Wp.shape[:-1], 0), Wp.new_zeros(Wp.shape[0], 0, Wp.shape[-1])
    return B, A, S, idx, objective


@register(
    "lowrank-sparse",
    needs=("gram",),
    options=LowRankSparseOptions,
    factorizes=False,
    summary="OATS: input-scaled low rank + sparse outliers, alternating SVD / hard threshold",
)
def decompose(W: torch.Tensor, stats, options: LowRankSparseOptions, rank=None) -> Decomposition:
    _, m, n = W.shape
    r, k = budget(m, n, options)
    per_row = options.sparsity_per == "row"
    d = channel_scales(stats, n, options.channel_floor).to(W.device, torch.float32)
    B, A, S, idx, _ = alternate(W.to(torch.float32) * d, r, k, options.iterations, per_row, svd=options.svd,
                                power_steps=options.power_steps, oversample=options.oversample)
    fmt = sparse_format(options, m, n, k, per_row) if k else "indices"
    A = A / d  # L diag(d)⁻¹
    out = []
    for i in range(W.shape[0]):
        if per_row:
            cols = idx[i] if k else torch.zeros(m, 0, dtype=torch.long, device=W.device)
            values = S[i].gather(-1, cols) / d[cols]
            indices = cols
        else:
            flat = idx[i] if k else torch.zeros(0, dtype=torch.long, device=W.device)
            rows, cols = flat // n, flat % n
            # Row-major order: the COO tensor is then already coalesced and the layout deterministic.
            order = flat.argsort()
            rows, cols = rows[order], cols[order]
            values = S[i][rows, cols] / d[cols]
            indices = torch.stack([rows, cols])
        out.append(LowRankSparse.from_indices(A[i], B[i], values, indices, in_features=n, per_row=per_row, fmt=fmt))
    return Decomposition(out)
