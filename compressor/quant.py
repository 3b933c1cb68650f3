"""Weight quantization primitives: round-to-nearest per group, and exact bit packing.

Conventions (torch layout, W is out x in = m x n): groups are `group_size` consecutive *input* columns of one
row; each group has one fp16 scale and one integer zero point. A quantized value q in [0, 2^b - 1] stands for
(q - zero) * scale. Packing is a dense bit stream per row into int32 words, so any width 2..8 costs exactly
b bits per weight (plus one padding word at most per row) — the checkpoint is really smaller.
"""

from __future__ import annotations

import math

import torch


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(m, n) -> (m, groups, group_size); a ragged last group is padded by repeating its last column,
    which leaves the group's min/max (and so its scale) unchanged."""
    m, n = w.shape
    g = num_groups(n, group_size)
    pad = g * group_size - n
    if pad:
        w = torch.cat([w, w[:, -1:].expand(m, pad)], dim=1)
    return w.reshape(m, g, group_size)


# Each group's [min, max] shrunk by p = 1, 0.99, ..., 0.4, keeping the p with the least Σ|w − ŵ|^2.4: the search of
# GPTQ's reference (`Quantizer.find_params(mse=True)`: grid 100, norm 2.4; llm-compressor's MSE observer), stopped
# at 0.4 where the reference goes on to 0.21 (maxshrink 0.8): on SmolLM2 every group's best p was ≥ 0.55 at 3 bits
# and ≥ 0.75 at 4 (layers 0/10/25: the same choices as the full grid), and each point is a pass over W.
# The exponent above 2 weighs the large errors that clipping creates against the many small rounding errors it
# removes; measured on SmolLM2 (GPTQ, act-order, 3-bit g128) it lowered the layers' relative output errors 5–10 %
# where plain squared error helped some and hurt others.
CLIP_SHRINKS = tuple(1.0 - i / 100 for i in range(61))
CLIP_NORM = 2.4
# Rows searched at a time (a 1 MB working buffer). The cost is |d|^2.4: on this CPU build pow runs ~20× slower than
# a multiply, ~5 ns an element and grid point, so a 7B layer's weights take ~1 min of one thread per GPTQ width.
_CLIP_BLOCK_ELEMENTS = 1 << 18


def _extremes(wg: torch.Tensor, symmetric: bool):
    """What a group's range is made of: its |max| (symmetric) or its min ≤ 0 ≤ max (asymmetric)."""
    if symmetric:
        return wg.abs().amax(dim=-1), None
    return wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)


def _params_at(extremes, bits: int, symmetric: bool, shrink: float):
    """(scale, zero) of groups whose range (`_extremes`) is scaled by `shrink` (1: the plain min/max)."""
    qmax = 2**bits - 1
    if symmetric:
        amax = extremes[0] * shrink
        scale = 2 * amax / qmax
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        wmin, wmax = extremes[0] * shrink, extremes[1] * shrink
        scale = (wmax - wmin) / qmax
        zero = torch.round(-wmin / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, qmax)
    # An all-zero group would give scale 0 and 0/0 later: any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Round scales to fp16 now so that quantization uses exactly the scales that get stored; round up, never
    # down, so the group's (shrunk) extremes still fall within half a step of a code.
    half = scale.half()
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return half.float(), zero


def _clipped_params(wg: torch.Tensor, valid: torch.Tensor, bits: int, symmetric: bool):
    qmax = 2**bits - 1
    extremes = _extremes(wg, symmetric)
    best_err = best_scale = best_zero = None
    err = torch.empty_like(wg)  # one working buffer, every step in place: the search is memory-bound
    for shrink in CLIP_SHRINKS:
        scale, zero = _params_at(extremes, bits, symmetric, shrink)
        s, z = scale[..., None], zero[..., None]
        torch.div(wg, s, out=err)
        err.round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s).sub_(wg).abs_().pow_(CLIP_NORM).mul_(valid)
        total = err.sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = total, scale, zero
            continue
        better = total < best_err  # strict: ties keep the wider range
        best_err = torch.where(better, total, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def rtn_params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: bool = False):
    """Per-group (scale, zero) for round-to-nearest, computed in fp32. Returns scale (m, g) fp32, zero (m, g).
    `clip`: search each group's range (CLIP_SHRINKS) for the least Σ|w − ŵ|^CLIP_NORM instead of its min/max; the
    stored format is the same."""
    wg = _grouped(w.float(), group_size)
    if not clip:
        return _params_at(_extremes(wg, symmetric), bits, symmetric, 1.0)
    m, g, gs = wg.shape
    valid = torch.ones(g * gs, dtype=wg.dtype, device=wg.device)
    valid[w.shape[1]:] = 0.0  # the ragged last group's padding columns do not count
    valid = valid.reshape(g, gs)
    rows = max(1, _CLIP_BLOCK_ELEMENTS // (g * gs))
    parts = [_clipped_params(wg[i : i + rows], valid, bits, symmetric) for i in range(0, m, rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes (m, n) in [0, 2^bits - 1] as int32."""
    m, n = w.shape
    s = scale.repeat_interleave(group_size, dim=1)[:, :n]
    z = zero.repeat_interleave(group_size, dim=1)[:, :n]
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    n = q.shape[1]
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :n]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :n]
    return (q.float() - z) * s


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (rows, k) with values < 2^bits into int32 words (rows, ceil(k*bits/32))."""
    rows, k = q.shape
    q = q.to(torch.int64)
    if 32 % bits == 0:
        # Whole values per word (2, 4, 8 bits): one shift per slot, int64 intermediates of the codes' size (the
        # bit stream below needs `bits`× that: over 1 GB for one 1B-model MLP matrix).
        per = 32 // bits
        words = math.ceil(k / per)
        q = torch.nn.functional.pad(q, (0, words * per - k)).reshape(rows, words, per)
        packed = (q << (torch.arange(per, dtype=torch.int64, device=q.device) * bits)).sum(-1)
        return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    # Other widths: 32 codes fill exactly `bits` words. Code i of a chunk starts at bit i·b: word (i·b) // 32,
    # offset (i·b) % 32; shifted there in int64, its low 32 bits belong to that word and any bits above to the
    # next. Codes never share a bit, so a sum is their OR: one product with a 0/1 (32 × b) matrix per half, in
    # fp64, exact (every word < 2^32 < 2^53). Temporaries of the codes' size (the bit-by-bit stream this replaces
    # held `bits`× that in int64: 1.8 GB for one 7B down_proj at 5 bits).
    words = math.ceil(k * bits / 32)
    chunks = math.ceil(k / 32)
    q = torch.nn.functional.pad(q, (0, chunks * 32 - k)).reshape(rows * chunks, 32)
    word, offset = _chunk_layout(bits, q.device)
    shifted = q << offset
    to_word = torch.zeros(2, 32, bits + 1, dtype=torch.float64, device=q.device)
    to_word[0, torch.arange(32, device=q.device), word] = 1.0
    to_word[1, torch.arange(32, device=q.device), word + 1] = 1.0  # the bits past a word go to the next one
    packed = (shifted & 0xFFFFFFFF).double() @ to_word[0, :, :bits]
    packed += (shifted >> 32).double() @ to_word[1, :, :bits]  # none past the chunk's last word: 32 codes fill it
    packed = packed.to(torch.int64).reshape(rows, chunks * bits)[:, :words]
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # reinterpret as signed


def _chunk_layout(bits: int, device):
    """For the 32 codes of a chunk: the word each starts in and its bit offset there."""
    start = torch.arange(32, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: (rows, words) int32 -> (rows, k) int32 codes."""
    rows, words = packed.shape
    p = packed.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:
        # Whole values per word (2, 4, 8 bits): one shift per slot instead of one per bit — the hot path of
        # QuantLinear.forward. Same layout as the bit stream: value i sits in word i // per at bit (i % per)·b.
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
        return ((p.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(rows, words * per)[:, :k].to(torch.int32)
    # A chunk's words plus a zero one: code i reads word[i] from its offset and the next word for what straddles
    # (a shift by 32 − offset ≥ b when nothing does, which the mask then clears).
    chunks = math.ceil(k / 32)
    p = torch.nn.functional.pad(p, (0, chunks * bits - words)).reshape(rows, chunks, bits)
    p = torch.nn.functional.pad(p, (0, 1))
    word, offset = _chunk_layout(bits, packed.device)
    codes = (p.index_select(2, word) >> offset) | (p.index_select(2, word + 1) << (32 - offset))
    return (codes & (2**bits - 1)).reshape(rows, chunks * 32)[:, :k].to(torch.int32)


def packed_words(k: int, bits: int) -> int:
    return math.ceil(k * bits / 32)
