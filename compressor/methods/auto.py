"""`auto`: per target, the encoding with the least output error that fits a byte budget (recipe `auto`).

Every target gets the same budget, D = `size_ratio` × its dense bytes in the output dtype (`dense_bits`). Each
candidate encoding that fits D is built and scored by its output error on the calibration inputs,
‖(W − Ŵ)X‖²_F = tr(Δ G Δᵀ) (G the Gram); the smallest wins. Candidates (`candidates`):
- `svd-llm`:        whitened truncation (SVD-LLM), factors in the output dtype, the largest rank that fits;
- `svd-llm-int8`, `svd-llm-int4`: the same with 8-/4-bit factors (compressor/methods/factor_quant.py), about 2×/4×
                    the rank;
- `gptq-8bit`, `gptq-4bit`: GPTQ with `group_size` columns per scale (≈ 0.51× / 0.26× of bf16 bytes);
- `gptq-8bit+eora`, `gptq-4bit+eora`: that base plus an EoRA residual (whitened truncation of W − Q) of the
                    rank the rest of D pays for, in the output dtype.
When no candidate fits (D below every encoding's floor) the method raises a UserError: a budget lrc cannot meet
is the user's one-line error, never a silent overshoot.

One whitening and one SVD of W S per target serve every low-rank candidate (each rank is a truncation of it).
Cost: a few GPTQ passes per target (column loops: seconds per layer of a 135M model on a CPU).
A greedy choice across targets (spending bytes where they remove the most error) is not done: the budget is
uniform, the encoding is not.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import UserError
from compressor.factors import Decomposition, LowRank
from compressor.linalg import DEFAULT_EIG_FLOOR
from compressor.methods.factor_quant import quantize_lowrank
from compressor.methods.gptq import GPTQOptions, gptq_quantize
from compressor.rank import factor_bytes, packed_bytes, rank_for_size
from compressor.registry import register

Candidate = Literal["svd-llm", "svd-llm-int8", "svd-llm-int4", "gptq-8bit", "gptq-4bit", "gptq-8bit+eora",
                    "gptq-4bit+eora"]
ALL: tuple = Candidate.__args__


class AutoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size_ratio: float = Field(0.5, gt=0, lt=1, description="each target's stored bytes / its dense bytes")
    candidates: tuple[Candidate, ...] = Field(ALL, min_length=1, description="encodings to choose from")
    group_size: int = Field(128, gt=0, description="columns per scale (GPTQ and quantised factors)")
    eig_floor: float = Field(DEFAULT_EIG_FLOOR, gt=0, lt=1)
    dense_bits: Optional[Literal[16, 32]] = Field(
        None, description="bits of one dense weight in the output dtype (the pipeline sets it; 16 when unknown)")


def _error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> float:
    D = W - W_hat
    return float(((D @ G) * D).sum())


def candidates(w: torch.Tensor, stats, white, options: AutoOptions) -> list[tuple[str, object]]:
    """[(name, factors)] of every candidate that fits the byte budget of the (m, n) weight `w`."""
    m, n = w.shape
    e = (options.dense_bits or 16) // 8
    budget = options.size_ratio * m * n * e
    W = w.to(torch.float64)
    U, s, Vh = torch.linalg.svd(W @ white.S, full_matrices=False)

    def lowrank(M_U, M_s, M_Vh, r, inverse) -> LowRank:
        root = M_s[:r].sqrt()
        return LowRank(A=((root[:, None] * M_Vh[:r]) @ inverse).float(), B=(M_U[:, :r] * root).float())

    out = []
    for name, bits in (("svd-llm", None), ("svd-llm-int8", 8), ("svd-llm-int4", 4)):
        if name not in options.candidates:
            continue
        r = rank_for_size(m, n, options.size_ratio, bits, options.group_size, e)
        if r == 0 or (bits is None and r * (m + n) >= m * n):
            continue
        f = lowrank(U, s, Vh, r, white.inverse)
        out.append((name, f if bits is None else quantize_lowrank(f, stats.gram, bits, options.group_size)))
    for bits in (8, 4):
        base_bytes = packed_bytes(m, n, bits, options.group_size)
        wanted = [c for c in (f"gptq-{bits}bit", f"gptq-{bits}bit+eora") if c in options.candidates]
        if not wanted or base_bytes > budget:
            continue
        base = gptq_quantize(w, GPTQOptions(bits=bits, group_size=options.group_size), stats)
        if f"gptq-{bits}bit" in wanted:
            out.append((f"gptq-{bits}bit", base))
        r = min(int((budget - base_bytes) // factor_bytes(m, n, 1, None, None, e)), m, n)
        if f"gptq-{bits}bit+eora" in wanted and r >= 1:
            dU, ds, dVh = torch.linalg.svd((W - base.dequantized().to(torch.float64)) @ white.S, full_matrices=False)
            out.append((f"gptq-{bits}bit+eora", replace(base, residual=lowrank(dU, ds, dVh, r, white.inverse))))
    return out


@register("auto", needs=("gram",), options=AutoOptions, factorizes=False,
          summary="per target, the least-output-error encoding (low rank, 8/4-bit factors, GPTQ, GPTQ+EoRA) "
                  "within a byte budget")
def decompose(W: torch.Tensor, stats, options: AutoOptions, rank=None) -> Decomposition:
    white = stats.whitening(options.eig_floor, "eigh")
    G = stats.gram.to(W.device, torch.float64)
    out = []
    for w in W:
        found = candidates(w, stats, white, options)
        if not found:
            raise UserError(f"auto: no candidate in {list(options.candidates)} fits size_ratio "
                            f"{options.size_ratio} of a {tuple(w.shape)} weight; raise size_ratio")
        W64 = w.to(torch.float64)
        out.append(min(found, key=lambda item: _error(W64, item[1].dense().to(W64.device), G))[1])
    return Decomposition(out, clamped_eigenvalues=white.clamped * W.shape[0])
