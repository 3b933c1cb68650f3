"""Quantised low-rank factors (recipe option `factor_bits`): store B A as b-bit codes, spending the bytes on rank.

A factorising method's answer L = B A (m × n, rank r) is replaced by B̂ Â with both factors in RTN/GPTQ's packed
format (compressor.quant: per-group fp16 scales and packed zero points; groups of `group_size` input columns of
each factor, or one group per row). Quantising each factor on its own would ignore the other; instead, with the
calibration Gram G = X Xᵀ, minimise the output error ‖(L − B̂ Â) X‖_F in three steps:

1. Balance: scale B's columns to unit norm and A's rows by the inverse (B A unchanged), so B's columns — which
   share a scale per group — have comparable ranges (for SVD-LLM B = U Σ^{1/2}: otherwise the largest singular
   direction sets every step). GPTQ-quantise B with its own input Gram A G Aᵀ (the inputs of B are A x).
2. Re-fit A for the quantised B̂: min_A ‖(L − B̂ A) X‖ → A = B̂⁺ L (exact least squares; G drops out where it is
   full rank), then GPTQ-quantise A on G (A reads x itself). GPTQ treats A's rows independently, which is exact
   when B̂ᵀB̂ is diagonal (nearly so after step 1: B's columns are orthogonal for whitened SVDs).
3. Re-fit B for the quantised Â: B = L G Âᵀ (Â G Âᵀ)⁻¹, GPTQ-quantise it on Â G Âᵀ; kept only when it lowers
   the output error on G.

Pure: tensors in, `QuantLowRank` out. Without a Gram (G = I) GPTQ is plain RTN and the fits are in weight space.
"""

from __future__ import annotations

import torch

from compressor.nn.factors import Decomposition, LowRank, Quantized, QuantLowRank, factor_group_size
from compressor.methods.gptq import GPTQOptions, gptq_codes, gptq_hessian


OPTIONS = GPTQOptions()  # damp, act-order (off: A's rows are quantised in column order) and range search


def input_hessian(gram: torch.Tensor):
    """GPTQ's factor of the input Gram for quantising A: the same for every target reading that input (q/k/v) and
    every bit width, so callers compute it once (an n³ solve: ~80 s of one thread for a 7B down_proj)."""
    return gptq_hessian(gram, OPTIONS.damp, OPTIONS.act_order, gram.device)


def _gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, hessian=None) -> Quantized:
    options = OPTIONS.model_copy(update={"bits": bits, "group_size": group_size})
    codes, scale, zero = gptq_codes(W.float(), H, options, hessian)
    return Quantized.from_codes(codes, scale, zero, bits, group_size)


def _output_error(B: torch.Tensor, A: torch.Tensor, Bh: torch.Tensor, Ah: torch.Tensor, G: torch.Tensor) -> float:
    """‖(B A − B̂ Â) X‖²_F, by whichever form is cheaper. Low rank (2r < m): tr(PᵀP · K G Kᵀ) with P = [B, −B̂]
    (m × 2r), K = [A; Â] (2r × n): 2r·n² flops and nothing m × n (a 70B down_proj's dense D G is m·n² flops and ~7 GB
    of fp64 temporaries). High rank (the int8 recipes' r is near min(m, n)): the m × n difference D, then Σ (D G) ∘ D,
    which is then the smaller of the two."""
    m, r = B.shape
    if 2 * r < m:
        P = torch.cat([B, -Bh], dim=1)
        K = torch.cat([A, Ah], dim=0)
        return float(((P.T @ P) * (K @ G @ K.T)).sum())  # tr(M N) = Σ M ∘ Nᵀ, both symmetric
    D = torch.addmm(B @ A, Bh, Ah, alpha=-1.0)
    return float(((D @ G) * D).sum())


@torch.no_grad()
def quantize_lowrank(factors: LowRank, gram: torch.Tensor | None, bits: int, group_size: int | None,
                     hessian=None) -> QuantLowRank:
    """Works on the factors only: L = B A (m × n) is never formed, so memory and time scale with the rank.
    `hessian`: input_hessian(gram) when the caller has it already."""
    A, B = factors.A.to(torch.float64), factors.B.to(torch.float64)
    r, n = A.shape
    G = torch.eye(n, dtype=torch.float64, device=A.device) if gram is None else gram.to(A.device, torch.float64)
    gA, gB = factor_group_size(group_size, n), factor_group_size(group_size, r)

    norms = torch.linalg.vector_norm(B, dim=0).clamp(min=1e-30)
    B, A = B / norms, A * norms[:, None]
    GA = G @ A.T  # n × r: every product with G below goes through it
    qB = _gptq(B, A @ GA, bits, gB)
    Bh = qB.dequantized().to(torch.float64)
    Af = (torch.linalg.pinv(Bh) @ B) @ A  # B̂⁺ L
    if hessian is not None:
        hessian = tuple(t.to(A.device) for t in hessian)
    qA = _gptq(Af, G, bits, gA, hessian)
    Ah = qA.dequantized().to(torch.float64)
    best = _output_error(B, A, Bh, Ah, G)

    GAh = G @ Ah.T
    H = Ah @ GAh
    damp = 1e-8 * H.diagonal().mean().clamp(min=1e-300) * torch.eye(r, dtype=H.dtype, device=H.device)
    B2 = torch.linalg.solve(H + damp, (Ah @ GA) @ B.T).T  # L G Âᵀ (Â G Âᵀ)⁻¹
    qB2 = _gptq(B2, H, bits, gB)
    if _output_error(B, A, qB2.dequantized().to(torch.float64), Ah, G) < best:
        qB = qB2
    return QuantLowRank(A=qA, B=qB, group_size=group_size)


def quantize_decomposition(result: Decomposition, gram: torch.Tensor | None, bits: int,
                           group_size: int | None) -> Decomposition:
    """Every LowRank of a method's answer as quantised factors (fitted on the shared input Gram)."""
    hessian = None if gram is None else input_hessian(gram.to(torch.float64))  # shared by the input's readers
    factors = [quantize_lowrank(f, gram, bits, group_size, hessian) for f in result.factors]
    return Decomposition(factors, clamped_eigenvalues=result.clamped_eigenvalues)
