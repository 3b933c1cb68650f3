"""GPTQ (Frantar et al., 2022): quantize columns one at a time, spreading each rounding error onto the columns
not yet quantized so that the output error ‖(W − Q)X‖_F stays small.

With H = 2 X Xᵀ (= 2·Gram) + λI, λ = damp · mean(diag H), and U the upper Cholesky factor of H⁻¹, column j is
rounded to q_j and the remaining columns are updated W[:, k>j] −= (w_j − q_j)/U_jj · U_j,k>j — the optimal
least-squares compensation given the columns already fixed (Optimal Brain Quantization). Columns are processed
in blocks of `block_size` (lazy batch updates); the result is identical to one column at a time.

Follows the reference implementation (IST-DASLab/gptq `fasterquant`; GPTQModel), with these choices:
- Dead inputs (diag H == 0: the channel was always zero) get H_ii = 1 and W[:, i] = 0, as in the reference;
  their weights never touch the output on the calibration data.
- Group scales/zeros use `compressor.quant.rtn_params` (fp16 scales rounded up, integer zeros), so the stored
  format is exactly RTN's. By default (`clip`) each group's range is searched as the reference's `mse=True`
  does (shrink 1 → 0.21, least Σ|w − ŵ|^2.4), not taken from its min/max: on SmolLM2 at 3 bits it lowered the
  layers' output errors 5–10 %. Without act-order a group's parameters are computed when its first column is
  reached, from the error-updated weights (the reference reads the block-start copy of the in-block columns;
  we read the current ones, which is what the rounding then sees).
- With `act_order` (columns in descending diag H order) lrc's storage still needs groups of consecutive
  *original* columns, so all group parameters are computed up front from W (the "static groups" of
  AutoGPTQ/GPTQModel) and each column is quantized with its own group's parameters. Codes are stored in the
  original column order; nothing is permuted at inference.
- H, its damping and Cholesky factors are computed in fp64; the column loop runs in fp32. A Cholesky that fails
  even after damping raises — no silent fallback to RTN.

Same-shape matrices sharing one input (q/k/v) share H, so their rows are quantized together in one pass.
"""

from __future__ import annotations

import torch
from pydantic import Field

from compressor import quant
from compressor.linalg import symmetric_copy
from compressor.nn.factors import Decomposition, Quantized
from compressor.methods.rtn import RTNOptions
from compressor.registry import register


class GPTQOptions(RTNOptions):
    clip: bool = Field(True, description="search each group's range for the least |w − ŵ|^2.4 (the reference's "
                       "mse option) instead of taking its min/max; same stored format")
    damp: float = Field(0.01, gt=0, lt=1, description="λ = damp · mean(diag H) added to H's diagonal")
    act_order: bool = Field(False, description="quantize columns in descending diag(H) order (static groups)")
    block_size: int = Field(128, gt=0, description="columns per lazy-update block")


def gptq_hessian(gram: torch.Tensor, damp: float, act_order: bool, device=None):
    """What GPTQ derives from the Gram alone, the same for every bit width, group size and matrix quantised on it:
    (dead inputs, column order, upper Cholesky factor of the damped H⁻¹ in that order, fp32). Callers that quantise
    several matrices or widths on one Gram (auto's candidates) compute it once and pass it to gptq_codes.

    At most two n × n fp64 matrices live at once besides the Gram (H, then H and its factor, then the factor and
    the inverse, ...): a 70B down_proj's is 6.6 GB each, and the textbook expressions held five."""
    H = symmetric_copy(gram, device=device).mul_(2.0)  # H = 2 X Xᵀ
    n = H.shape[0]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        H = H.index_select(0, perm)
        H = H.index_select(1, perm)
    else:
        perm = torch.arange(n, device=H.device)
    torch.diagonal(H).add_(damp * torch.diagonal(H).mean())
    L, info = torch.linalg.cholesky_ex(H)
    del H
    if int(info) == 0:
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
    if int(info) != 0:
        raise FloatingPointError(
            f"GPTQ: Cholesky of the damped Hessian failed (leading minor {int(info)} of {n} not positive) "
            f"with damp={damp}; the calibration Gram is not usable — raise `damp` or check the statistics"
        )
    return dead, perm, U.to(torch.float32)


def gptq_codes(W: torch.Tensor, gram: torch.Tensor, options: GPTQOptions, hessian=None, with_error: bool = False):
    """W: (rows, n). Returns codes (rows, n) int32 in original column order, scale (rows, g) fp32, zero (rows, g),
    and with `with_error` each row's output error on the Gram, (Δ G Δᵀ)_ii with Δ = W − Q (fp64, (rows,)).
    `hessian`: gptq_hessian(gram, options.damp, options.act_order) when the caller has it already.

    The error comes from the column loop itself, not from a product with G (2·rows·n² flops: at 7B, ~20 minutes of
    one CPU thread a layer for auto's five widths): the loop writes Δ = e U with U the upper Cholesky factor of
    H_d⁻¹ and e its scaled rounding errors, so Δ H_d Δᵀ = ‖e‖², and with H_d = 2G + λI (dead inputs: Δ = 0 there)
    Δ G Δᵀ = (‖e‖² − λ‖Δ‖²) / 2, exact up to the loop's fp32 rounding (tests/test_methods_asvd_gptq.py)."""
    rows, n = W.shape
    bits, gs, sym = options.bits, options.group_size, options.symmetric
    qmax = 2**bits - 1
    W = W.detach().to(torch.float32).clone()
    dead, perm, U = hessian or gptq_hessian(gram, options.damp, options.act_order, W.device)
    W[:, dead] = 0.0

    groups = quant.num_groups(n, gs)
    scale = torch.empty(rows, groups, dtype=torch.float32, device=W.device)
    zero = torch.empty(rows, groups, dtype=torch.float32, device=W.device)
    if options.act_order:
        scale[:], zero[:] = quant.rtn_params(W, bits, gs, sym, options.clip)  # static groups in original column order
        W = W[:, perm]
    group_of = (perm // gs).tolist()  # group (original order) of each processed column

    Q = torch.empty(rows, n, dtype=torch.int32, device=W.device)
    loss = torch.zeros(rows, dtype=torch.float64, device=W.device) if with_error else None  # Σ_j e_j² per row
    kept = W.clone() if with_error else None  # the weights GPTQ quantises (dead inputs zeroed), permuted
    for i1 in range(0, n, options.block_size):
        i2 = min(i1 + options.block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not options.act_order and col % gs == 0:
                later = max(0, col + gs - i2)  # columns of this group beyond the block
                ahead = torch.cat([W1[:, i : i + gs], W[:, i2 : i2 + later]], dim=1)  # the group's current weights
                s, z = quant.rtn_params(ahead, bits, gs, sym, options.clip)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g], zero[:, g]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, qmax)
            Q[:, col] = q.to(torch.int32)
            err = (w - (q - z) * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        if with_error:
            loss += Err1.to(torch.float64).pow(2).sum(1)

    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    if not with_error:
        return codes, scale, zero
    del W
    delta = kept.sub_(quant.dequantize(codes, scale, zero, gs)[:, perm])
    h = 2.0 * torch.diagonal(gram).to(delta.device, torch.float64)
    h[dead.to(h.device)] = 1.0
    lam = options.damp * h.mean()
    error = (loss - lam * delta.to(torch.float64).pow(2).sum(1)) / 2
    return codes, scale, zero, error


def gptq_quantize(w: torch.Tensor, options: GPTQOptions, stats, hessian=None) -> Quantized:
    """One (m, n) matrix -> packed GPTQ codes; also EoRA's `gptq` base. `hessian`: see gptq_codes."""
    codes, scale, zero = gptq_codes(w, stats.gram, options, hessian)
    return Quantized.from_codes(codes, scale, zero, options.bits, options.group_size)


@register("gptq", needs=("gram",), options=GPTQOptions, factorizes=False, summary="GPTQ b-bit quantization with error feedback")
def decompose(W: torch.Tensor, stats, options: GPTQOptions, rank=None) -> Decomposition:
    """W: (b, m, n) sharing one Gram: quantized as one (b·m, n) matrix (GPTQ treats rows independently)."""
    b, m, n = W.shape
    codes, scale, zero = gptq_codes(W.reshape(b * m, n), stats.gram, options)
    return Decomposition(
        [
            Quantized.from_codes(c, s, z, options.bits, options.group_size)
            for c, s, z in zip(codes.split(m), scale.split(m), zero.split(m))
        ]
    )
