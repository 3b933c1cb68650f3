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


def rtn_params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Per-group (scale, zero) for round-to-nearest, computed in fp32. Returns scale (m, g) fp32, zero (m, g)."""
    wg = _grouped(w.float(), group_size)
    qmax = 2**bits - 1
    if symmetric:
        amax = wg.abs().amax(dim=-1)
        scale = 2 * amax / qmax
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        wmin = wg.amin(dim=-1).clamp(max=0)
        wmax = wg.amax(dim=-1).clamp(min=0)
        scale = (wmax - wmin) / qmax
        zero = torch.round(-wmin / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, qmax)
    # An all-zero group would give scale 0 and 0/0 later: any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Round scales to fp16 now so that quantization uses exactly the scales that get stored; round up, never
    # down, so the group's extremes still fall within half a step of a code (no clipping).
    half = scale.half()
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    scale = half.float()
    return scale, zero


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
    shifts = torch.arange(bits, dtype=torch.int64, device=q.device)
    stream = ((q.unsqueeze(-1) >> shifts) & 1).reshape(rows, k * bits)  # little-endian bit stream per row
    words = math.ceil(k * bits / 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - k * bits))
    weights = torch.ones(32, dtype=torch.int64, device=q.device) << torch.arange(32, device=q.device)
    packed = (stream.reshape(rows, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # reinterpret as signed


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
    shifts = torch.arange(32, dtype=torch.int64, device=packed.device)
    stream = ((p.unsqueeze(-1) >> shifts) & 1).reshape(rows, words * 32)[:, : k * bits]
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(bits, device=packed.device)
    return (stream.reshape(rows, k, bits) * weights).sum(-1).to(torch.int32)


def packed_words(k: int, bits: int) -> int:
    return math.ceil(k * bits / 32)
