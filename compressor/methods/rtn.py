"""Round-to-nearest weight quantization (per group of input columns, asymmetric by default), really packed."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from compressor import quant
from compressor.nn.factors import Decomposition, Quantized
from compressor.registry import register


class RTNOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, gt=0, description="input columns per scale/zero")
    symmetric: bool = False
    clip: bool = Field(False, description="search each group's range for the least |w − ŵ|^2.4 (quant.CLIP_SHRINKS) "
                       "instead of taking its min/max; same stored format")


def rtn_quantize(W: torch.Tensor, options, stats=None) -> Quantized:
    """One (m, n) matrix. `stats` is unused: the signature is shared with the other EoRA bases (eora.BASES)."""
    scale, zero = quant.rtn_params(W, options.bits, options.group_size, options.symmetric, options.clip)
    q = quant.quantize(W, scale, zero, options.bits, options.group_size)
    return Quantized.from_codes(q, scale, zero, options.bits, options.group_size)


@register("rtn", needs=(), options=RTNOptions, factorizes=False, summary="round-to-nearest b-bit quantization")
def decompose(W: torch.Tensor, stats, options: RTNOptions, rank=None) -> Decomposition:
    return Decomposition([rtn_quantize(w, options) for w in W])
