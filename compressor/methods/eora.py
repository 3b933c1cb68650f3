"""EoRA: a low-rank residual path that repairs a quantized base, fitted in the activation eigenspace.

Base Q = quant(W); residual ΔW = W − Q. With G = X Xᵀ = S Sᵀ (S = V Λ^{1/2}, clamped), the rank-r truncated
SVD of ΔW S gives B A' and A = A' S⁻¹: the whitened truncation of ΔW, minimising ‖(ΔW − BA)X‖_F. The layer
computes Q x + B (A x); the r(m + n) residual parameters are full precision and counted in the report.

The base is RTN (`base: rtn`) or GPTQ (`base: gptq`, which reads the same Gram; its options `damp`,
`act_order`, `block_size` are accepted only with that base). Recipe `eora-4bit` uses rank 64 (the EoRA paper's
and GPTQModel's usual setting for 7B-class models); `eora-gptq-4bit` is the paper's setting (GPTQ base with
act-order).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from compressor.nn.factors import Decomposition, LowRank
from compressor.linalg import DEFAULT_EIG_FLOOR, SVDSolver, WhiteningMethod, split_factors, whitened_svd
from compressor.methods.gptq import GPTQOptions, gptq_quantize
from compressor.methods.rtn import rtn_quantize
from compressor.registry import register

# Quantized bases: (w (m, n), options, stats) -> Quantized.
BASES = {"rtn": rtn_quantize, "gptq": gptq_quantize}
BaseName = Literal["rtn", "gptq"]
_GPTQ_ONLY = ("damp", "act_order", "block_size")


class EoRAOptions(GPTQOptions):
    base: BaseName = "rtn"
    rank: int = Field(64, gt=0, description="rank of the residual path (capped at min(m, n))")
    eig_floor: float = Field(DEFAULT_EIG_FLOOR, gt=0, lt=1)
    svd_solver: SVDSolver = "gram"
    whitening: WhiteningMethod = "eigh"

    @model_validator(mode="before")
    @classmethod
    def _clip_follows_the_base(cls, data):
        """The base quantises as its own method does unless told: `rtn` on min/max, `gptq` with the range search."""
        if isinstance(data, dict) and "clip" not in data:
            data = {**data, "clip": data.get("base", "rtn") == "gptq"}
        return data

    @model_validator(mode="after")
    def _base_options(self):
        stray = sorted(set(_GPTQ_ONLY) & self.model_fields_set) if self.base != "gptq" else []
        if stray:
            raise ValueError(f"{', '.join(stray)} only apply to base: gptq (base is {self.base!r})")
        return self


@register("eora", needs=("gram",), options=EoRAOptions, factorizes=False, summary="quantized base + whitened low-rank residual")
def decompose(W: torch.Tensor, stats, options: EoRAOptions, rank=None) -> Decomposition:
    rank = min(options.rank, W.shape[-2], W.shape[-1])
    out, clamped = [], 0
    for w in W:
        base = BASES[options.base](w, options, stats)
        delta = w.to(torch.float64) - base.dequantized().to(torch.float64)
        U, s, P, clamps = whitened_svd(delta, rank, lambda: stats.gram,
                                       lambda: stats.whitening(options.eig_floor, options.whitening),
                                       options.svd_solver)
        B, A = split_factors(U, s, P)
        base.residual = LowRank(A=A.float(), B=B.float())
        out.append(base)
        clamped += clamps
    return Decomposition(out, clamped_eigenvalues=clamped)
