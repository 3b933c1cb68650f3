"""`auto`: every target gets the encoding with the least output error that its byte budget pays for (recipe `auto`,
`lrc compress --target-size`).

Candidates (`candidates`), each at the exact bytes the checkpoint will hold (compressor.budget.rank):
- `svd-llm`:        whitened truncation (SVD-LLM), factors in the output dtype, rank r;
- `svd-llm-int8`, `svd-llm-int4`: the same with 8-/4-bit factors (compressor/methods/factor_quant.py);
- `gptq-8bit` … `gptq-3bit`: GPTQ with `group_size` columns per scale (8-bit: one scale per row; 6- and 5-bit:
                    one scale per row under `speed: packed`, `group_size_mid`). 8 bits and per-row 6/5 bits run on
                    torch's int8 kernel, 4 and 3 bits on its int4 kernel (compressor/nn/kernels.py); 6 and 5 bits with
                    groups dequantise on every forward (slower inference, the same bytes on disk and in memory);
- `gptq-Nbit+eora`: that base plus an EoRA residual (whitened truncation of W − Q) of rank r, in the output dtype.

Two ways to spend the budget:
- `allocation: global` (the recipe's default): one planning pass on the dense model offers, per target, every
  candidate at every rank of a grid (`rank_step`) with its predicted output error (`choices`, below); a greedy
  multiple-choice knapsack (compressor/budget/byte_budget.py) picks one encoding per target so that all targets together
  store at most `size_ratio` of their dense bytes, spending bytes where they remove the most error. With
  `allocation_options.weight: loss` each output channel's error is weighted by the loss's squared gradient there
  (compressor/budget/allocation.py), so errors are comparable across modules. The chosen encodings are then built layer
  by layer on the recipe's calibration inputs; the report shows each target's predicted error next to the measured.
- `allocation: uniform`: every target gets the same budget, D = `size_ratio` × its dense bytes; each candidate
  that fits D is built and its output error measured, and the smallest wins.

Predicted errors, ‖(W − Ŵ)X‖² on the dense calibration inputs (G = X Xᵀ = S Sᵀ), per output channel weight h:
- whitened truncation at rank r: with W S = U Σ Vᵀ, exactly Σ_{j>r} σ_j² Σ_i h_i U_ij² (the same for EoRA's
  residual (W − Q) S);
- GPTQ: exact, Σ_i h_i (Δ G Δᵀ)_ii, from GPTQ's own column loop (gptq.gptq_codes `with_error`, no m·n² product);
- quantised factors: the truncation's error plus κ × the kept energy, κ measured once per target and bit width at
  one probe rank (factor quantisation noise is roughly a fixed fraction of what the factors carry).
`speed` (what the output's decode speed may cost): `packed` offers a target only the encodings that run there on a
packed kernel of this torch build (kernels.fallback_reason on CPU: GPTQ at 8/6/5 bits per row on the int8 kernel
and at 4/3/2 bits on the int4 kernel, where the shape allows) or as dense GEMMs (`svd-llm`, EoRA residuals), so
`--target-size` never returns layers that dequantise on every forward (grouped 5-/6-bit GPTQ, 8-/4-bit low-rank
factors); `any` offers every candidate. Unset, it is `packed` with the default candidates and `any` with a
`candidates` list (a named encoding is built as asked). On SmolLM2 at 0.4× (docs/benchmarks.md): grouped 6-/5-bit
(`any`) 42.74, decoding 0.20× dense; `packed` without 6-/5-bit 43.20; `packed` with per-row 6-/5-bit 42.67, 1.5×.
When no candidate fits the method raises a UserError: a budget lrc cannot meet is a one-line error, never a
silent overshoot.

`export: compressed-tensors` keeps only what `lrc export --serving` writes at the budgeted size and transformers
loads back exactly: GPTQ of ONE width (compressed-tensors packs 1-8 bits; transformers 5.24 dequantises every
layer of a checkpoint with one scheme, see compressor/io/export_serving.py), with or without an EoRA residual (it
becomes a PEFT LoRA adapter); never dense (vLLM refuses q/k/v or gate/up with one part dense). Low-rank factors
would be exported densified, larger than the budget paid for. The default candidates become SERVABLE's (4 bits);
`candidates` may name another width ([gptq-3bit, gptq-3bit+eora] for smaller sizes). Low-rank or mixed widths are
a one-line error, and so is a group size that does not divide a target's in_features (compressed-tensors has no
ragged last group). The budget counts the export's bytes (fp32 scales, compressor/io/export_adapter.py), so
the lrc output lands slightly below the size and the export at most at it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cached_property
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compressor import quant
from compressor.budget.byte_budget import Choice
from compressor.errors import UserError
from compressor.nn.factors import Decomposition, LowRank, Quantized
from compressor.linalg import DEFAULT_EIG_FLOOR, whitened_svd
from compressor.methods.factor_quant import input_hessian, quantize_lowrank
from compressor.nn import kernels
from compressor.methods.gptq import GPTQOptions, gptq_codes, gptq_hessian
from compressor.budget.rank import factor_bytes, packed_bytes, rank_for_size
from compressor.registry import register

Candidate = Literal["svd-llm", "svd-llm-int8", "svd-llm-int4", "gptq-8bit", "gptq-6bit", "gptq-5bit", "gptq-4bit",
                    "gptq-3bit", "gptq-8bit+eora", "gptq-4bit+eora", "gptq-3bit+eora"]
ALL: tuple = Candidate.__args__
# Every candidate by default; `speed` (unset: packed) then keeps those with a packed path on each target.
DEFAULT: tuple = ALL
LOWRANK_BITS = {"svd-llm": None, "svd-llm-int8": 8, "svd-llm-int4": 4}
MID_BITS = (6, 5)  # GPTQ widths between the int8 and int4 kernels (`group_size_mid`)
PROBE_SIZE = 0.4  # the size (fraction of dense bytes) at which quantised factors' noise is measured
# The default candidates of each `export` (module docstring; compressor/io/export_serving.py): 4 bits, a width
# vLLM's WNA16 kernels take.
SERVABLE = {"compressed-tensors": ("gptq-4bit", "gptq-4bit+eora")}


class AutoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size_ratio: float = Field(0.5, gt=0, lt=1, description="the targets' stored bytes / their dense bytes")
    export: Optional[Literal["compressed-tensors"]] = Field(
        None, description="only encodings that `lrc export --serving` writes at their budgeted size (the default "
                          "candidates are narrowed to those)")
    speed: Optional[Literal["packed", "any"]] = Field(
        None, description="packed: only encodings with a packed kernel (or dense GEMMs) on each target, so decode is "
                          "no slower than dense; any: every candidate (grouped 5-/6-bit GPTQ and quantised low-rank "
                          "factors dequantise on every forward); unset: packed with the default candidates, any with "
                          "a candidates list")
    candidates: tuple[Candidate, ...] = Field(DEFAULT, min_length=1, validate_default=True,
                                              description="encodings to choose from")
    group_size: int = Field(128, gt=0, description="columns per scale (GPTQ and quantised factors)")
    group_size_8bit: Optional[int] = Field(
        None, gt=0, description="columns per scale of 8-bit GPTQ (None: one scale per row, the layout torch's int8 "
                                "matmul kernel takes; 8 bits need no finer groups)")
    group_size_mid: Optional[int] = Field(
        None, gt=0, description="columns per scale of 6- and 5-bit GPTQ (None: one scale per row under speed: packed, "
                                "the layout torch's int8 kernel runs exactly; group_size under speed: any)")
    act_order: bool = Field(True, description="GPTQ in descending order of input energy (static groups: the same "
                                             "stored layout)")
    rank_step: int = Field(8, gt=0, description="allocation: global tries ranks that are multiples of this")
    eig_floor: float = Field(DEFAULT_EIG_FLOOR, gt=0, lt=1)
    dense_bits: Optional[Literal[16, 32]] = Field(
        None, description="bits of one dense weight in the output dtype (the pipeline sets it; 16 when unknown)")

    @model_validator(mode="before")
    @classmethod
    def _resolve_speed(cls, data):
        """Unset `speed` becomes what it means (packed with the default candidates, any with a list), so the
        report and the output's recipe say it; an export's own candidates keep it unset (module docstring)."""
        if isinstance(data, dict) and data.get("speed") is None and not data.get("export"):
            data = {**data, "speed": "any" if data.get("candidates") is not None else "packed"}
        return data

    @field_validator("candidates")
    @classmethod
    def _servable(cls, value, info):
        export = info.data.get("export")
        if export is None:
            return value
        if tuple(value) == DEFAULT:
            return SERVABLE[export]
        low_rank = [name for name in value if name in LOWRANK_BITS]
        if low_rank:
            raise ValueError(f"export: {export} cannot hold {', '.join(low_rank)} at its budgeted size (low-rank "
                             "factors are exported dense); choose GPTQ candidates of one width, e.g. "
                             "[gptq-3bit, gptq-3bit+eora]")
        if len({_gptq_bits(name) for name in value}) > 1:
            raise ValueError(f"export: {export} takes GPTQ candidates of one width (transformers loads one "
                             f"compressed-tensors scheme per checkpoint), got {', '.join(value)}")
        return value

    @property
    def packed_only(self) -> bool:
        """Whether each target is offered only encodings with a packed inference path (`speed`, module docstring).
        An export's candidates are its own restriction (what the serving engine runs)."""
        return self.speed == "packed"


def _gptq_bits(name: str) -> int:
    return int(name.split("-")[1].split("bit")[0])


def _lowrank(U, s, P, r) -> LowRank:
    """Rank r of the whitened SVD (U, s, P = Vᵀ S⁻¹): B = U √s, A = √s P."""
    root = s[:r].sqrt()
    return LowRank(A=(root[:, None] * P[:r]).float(), B=(U[:, :r] * root).float())


def _row_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per output channel i: (Δ G Δᵀ)_ii, fp64."""
    D = W.to(torch.float64) - W_hat.to(W.device, torch.float64)
    return ((D @ G) * D).sum(1)


def _tails(U, s, h) -> torch.Tensor:
    """tails[r] = the error of the rank-r truncation, Σ_{j≥r} σ_j² Σ_i h_i U_ij² (h None: 1); tails[len] = 0."""
    c = s.pow(2) if h is None else s.pow(2) * (h[:, None] * U.pow(2)).sum(0)
    return torch.cat([c.flip(0).cumsum(0).flip(0), c.new_zeros(1)])


class _Target:
    """One (m, n) weight with its whitened SVD, shared by every low-rank candidate (each rank is a truncation)."""

    def __init__(self, w, stats, options: AutoOptions):
        self.w, self.stats, self.options = w, stats, options
        self.clamped = 0  # eigenvalues clamped by the whitening, if a solve needed it (linalg.whitened_svd)
        self.m, self.n = w.shape
        self.e = (options.dense_bits or 16) // 8
        self.W = w.to(torch.float64)
        self._bases = {}  # bits -> (GPTQ base, its per-row output error on the Gram)
        if options.export:
            self._check_groups()

    def _check_groups(self):
        """A serving export has no ragged last group: refuse before any work rather than at export time."""
        for name in self.options.candidates:
            group = self._group(_gptq_bits(name))
            if group < self.n and self.n % group:
                raise UserError(f"auto: export: {self.options.export} needs group sizes that divide in_features; "
                                f"{name} on a {self.m}x{self.n} weight has group size {group}: set group_size"
                                f"{'_8bit' if _gptq_bits(name) == 8 else ''} to a divisor of {self.n} "
                                f"(e.g. {math.gcd(self.n, group)})")

    def offered(self) -> list[str]:
        """The candidates this target may take: all, or under `speed: packed` those with a packed path here."""
        if not self.options.packed_only:
            return list(self.options.candidates)
        return [name for name in self.options.candidates if self._packed(name)]

    def _packed(self, name: str) -> bool:
        if name in LOWRANK_BITS:
            return LOWRANK_BITS[name] is None  # quantised factors dequantise on every forward
        bits = _gptq_bits(name)
        return kernels.fallback_reason(bits, self._group(bits), self.n, self.m, "cpu") is None

    @cached_property
    def svd(self):
        return self._whitened_svd(self.W)

    def _whitened_svd(self, M: torch.Tensor):
        """Every singular triplet of M S as (U, s, Vᵀ S⁻¹), through eigh of the smaller Gram (linalg's "gram"
        solver: 2-3× faster than an SVD on CPUs; a wide M never factors the n×n Gram)."""
        U, s, P, clamped = whitened_svd(M, min(M.shape), lambda: self.stats.gram,
                                        lambda: self.stats.whitening(self.options.eig_floor, "eigh"))
        self.clamped = max(self.clamped, clamped)
        return U, s, P

    def base(self, bits: int):
        return self._gptq(bits)[0]

    def base_row_error(self, bits: int) -> torch.Tensor:
        """(Δ G Δᵀ)_ii of the b-bit GPTQ base, from GPTQ's own column loop (gptq.gptq_codes): no m·n² product."""
        return self._gptq(bits)[1]

    def _gptq(self, bits: int):
        if bits not in self._bases:
            options = GPTQOptions(bits=bits, group_size=self._group(bits), act_order=self.options.act_order)
            # GPTQ's Hessian factor depends on the Gram alone: one per shared input (q/k/v), for every width.
            key = ("gptq_hessian", options.damp, options.act_order, str(self.w.device))
            hessian = self.stats.derived(key, lambda: gptq_hessian(self.stats.gram, options.damp, options.act_order,
                                                                   self.w.device))
            codes, scale, zero, error = gptq_codes(self.w, self.stats.gram, options, hessian, with_error=True)
            self._bases[bits] = Quantized.from_codes(codes, scale, zero, bits, options.group_size), error
        return self._bases[bits]

    def _group(self, bits: int) -> int:
        if bits == 8:
            return self.options.group_size_8bit or self.n
        if bits in MID_BITS:
            # Grouped 6-/5-bit codes have no kernel; with one scale per row they run on the int8 one (exactly).
            return self.options.group_size_mid or (self.n if self.options.packed_only else self.options.group_size)
        return self.options.group_size

    def build(self, name: str, r: int):
        if name in LOWRANK_BITS:
            f = _lowrank(*self.svd, r)
            bits = LOWRANK_BITS[name]
            if bits is None:
                return f
            hessian = self.stats.derived(("factor_hessian", str(self.w.device)),
                                         lambda: input_hessian(self.stats.gram.to(self.w.device, torch.float64)))
            return quantize_lowrank(f, self.stats.gram, bits, self.options.group_size, hessian)
        bits = _gptq_bits(name)
        if not name.endswith("+eora"):
            return self.base(bits)
        return replace(self.base(bits), residual=_lowrank(*self.residual_svd(bits), r))

    def residual_svd(self, bits: int):
        """SVD of (W − Q) S for the b-bit GPTQ base Q: EoRA's residual, whitened."""
        return self._whitened_svd(self.W - self.base(bits).dequantized().to(torch.float64))

    def bytes(self, name: str, r: int) -> int:
        gs = self.options.group_size
        if name in LOWRANK_BITS:
            return factor_bytes(self.m, self.n, r, LOWRANK_BITS[name], gs, self.e)
        bits = _gptq_bits(name)
        base = packed_bytes(self.m, self.n, bits, self._group(bits))
        if self.options.export:  # the export stores the scales in fp32 (exact), 2 bytes a group more than lrc
            base += 2 * self.m * quant.num_groups(self.n, self._group(bits))
        return base + (factor_bytes(self.m, self.n, r, None, None, self.e) if name.endswith("+eora") else 0)


def candidates(t: "_Target", options: AutoOptions) -> list[tuple[str, object]]:
    """[(name, factors)] of every candidate that fits `size_ratio` of the (m, n) weight `w`, each at the largest
    rank that fits (uniform allocation)."""
    budget = options.size_ratio * t.m * t.n * t.e
    out = []
    for name in t.offered():
        if name in LOWRANK_BITS:
            r = rank_for_size(t.m, t.n, options.size_ratio, LOWRANK_BITS[name], options.group_size, t.e)
            if r == 0 or (LOWRANK_BITS[name] is None and r * (t.m + t.n) >= t.m * t.n):
                continue
        elif name.endswith("+eora"):
            left = budget - t.bytes(name, 0)
            r = min(int(left // factor_bytes(t.m, t.n, 1, None, None, t.e)), t.m, t.n) if left > 0 else 0
            if r < 1:
                continue
        else:
            r = 0
            if t.bytes(name, 0) > budget:
                continue
        out.append((name, t.build(name, r)))
    return out


def choices(w: torch.Tensor, stats, options: AutoOptions, row_weight: torch.Tensor | None = None) -> list[Choice]:
    """Every candidate at every rank of the grid, with exact bytes and predicted output error (module docstring),
    plus keeping the target dense. `row_weight`: √h per output channel (errors weighted by h), or None."""
    t = _Target(w, stats, options)
    G = stats.gram.to(w.device, torch.float64)
    h = None if row_weight is None else row_weight.to(w.device, torch.float64).pow(2)
    U, s, _ = t.svd
    total = float(s.pow(2).sum().clamp(min=1e-300))  # ‖W X‖² (tall targets: through the clamped whitening)
    raw, weighted = _tails(U, s, None), _tails(U, s, h)
    dense = t.m * t.n * t.e
    # A serving export keeps every target quantised: vLLM fuses q/k/v and gate/up and refuses a fused layer with
    # one part dense (in `ignore`) and another quantised.
    out = [] if options.export else [Choice(None, dense, 0.0, 0.0)]
    step, full = options.rank_step, min(t.m, t.n)
    ranks = sorted(set(range(step, full + 1, step)) | {full})

    def add(name, r, err, err_raw):
        nbytes = t.bytes(name, r)
        if nbytes < dense:
            out.append(Choice((name, r), nbytes, max(err, 0.0), max(err_raw, 0.0) ** 0.5 / total ** 0.5))

    def weigh(rows: torch.Tensor) -> float:  # per-channel errors -> the allocation's (loss-weighted) error
        return float(rows.sum() if h is None else (rows * h).sum())

    def noise_fraction(error: float, tail: torch.Tensor, probe: int) -> float:  # κ: extra error / kept energy
        return max(error - float(tail[probe]), 0.0) / max(float(tail[0] - tail[probe]), 1e-300)

    for name in t.offered():
        if name in LOWRANK_BITS and LOWRANK_BITS[name] is None:
            for r in ranks:
                add(name, r, float(weighted[r]), float(raw[r]))
        elif name in LOWRANK_BITS:  # quantised factors: κ × kept energy on top of the truncation's error
            bits = LOWRANK_BITS[name]
            probe = min(max(rank_for_size(t.m, t.n, PROBE_SIZE, bits, options.group_size, t.e), 1), full)
            rows = _row_error(t.W, t.build(name, probe).dense(), G)
            k_raw = noise_fraction(float(rows.sum()), raw, probe)
            k_weighted = noise_fraction(weigh(rows), weighted, probe)
            for r in ranks:
                add(name, r, float(weighted[r] + k_weighted * (weighted[0] - weighted[r])),
                    float(raw[r] + k_raw * (raw[0] - raw[r])))
        elif not name.endswith("+eora"):
            rows = t.base_row_error(_gptq_bits(name))
            add(name, 0, weigh(rows), float(rows.sum()))
        else:
            dU, ds, _ = t.residual_svd(_gptq_bits(name))
            r_raw, r_weighted = _tails(dU, ds, None), _tails(dU, ds, h)
            for r in ranks:
                if r <= ds.numel():
                    add(name, r, float(r_weighted[r]), float(r_raw[r]))
    return out


def _uniform(t: _Target, options: AutoOptions, G):
    w = t.w
    found = candidates(t, options)
    if not found:
        raise UserError(f"auto: no candidate in {t.offered()} fits size_ratio {options.size_ratio} of a "
                        f"{tuple(w.shape)} weight; raise size_ratio"
                        + (" or set speed: any" if options.packed_only else ""))
    W64 = w.to(torch.float64)
    return min(found, key=lambda item: float(_row_error(W64, item[1].dense(), G).sum()))[1]


@register("auto", needs=("gram",), options=AutoOptions, factorizes=False, choices=choices,
          summary="per target, the least-output-error encoding (low rank, 8/4-bit factors, GPTQ, GPTQ+EoRA) "
                  "within a byte budget; allocation: global spends it across targets")
def decompose(W: torch.Tensor, stats, options: AutoOptions, rank=None) -> Decomposition:
    """`rank`: the encoding (name, rank) that allocation: global chose for these targets; None: uniform budget."""
    G = stats.gram.to(W.device, torch.float64)
    targets = [_Target(w, stats, options) for w in W]
    if rank is None:
        out = [_uniform(t, options, G) for t in targets]
    else:
        out = [t.build(*rank) for t in targets]
    return Decomposition(out, clamped_eigenvalues=sum(t.clamped for t in targets))
