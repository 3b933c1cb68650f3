"""nn.Modules that replace nn.Linear after compression. Only modules here: the maths lives in methods/.

Parameter names are part of the checkpoint format (config.json's quantization_config records each module's
`spec`; `empty_module(spec, ...)` rebuilds the empty module so the state dict loads):
- LowRankLinear: `A.weight` (r, in), `B.weight` (out, r), `B.bias` (out) — y = B(A x) + bias.
- QuantLinear: buffers `qweight`, `qzeros` (int32, packed), `scales` (fp16); optional `bias`; optional EoRA
  residual `lora_A.weight`, `lora_B.weight` — y = dequant(W) x + bias + lora_B(lora_A x).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor import quant
from compressor.factors import LowRank, Quantized


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.B(self.A(x))

    def dense_weight(self) -> torch.Tensor:
        return self.B.weight.double() @ self.A.weight.double()

    def spec(self) -> dict:
        return {"kind": "lowrank", "rank": self.rank}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class QuantLinear(nn.Module):
    def __init__(self, in_features, out_features, bits, group_size, bias: bool, rank: int = 0, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rank = bits, group_size, rank
        groups = quant.num_groups(in_features, group_size)
        i32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(out_features, quant.packed_words(in_features, bits), **i32))
        self.register_buffer("qzeros", torch.zeros(out_features, quant.packed_words(groups, bits), **i32))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        if rank:
            self.lora_A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
            self.lora_B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not touch the fp16 scales: they are part of the packed format.
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float16:
            self.scales = self.scales.to(torch.float16)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        q = quant.unpack(self.qweight, self.bits, self.in_features)
        zero = quant.unpack(self.qzeros, self.bits, self.scales.shape[1])
        return quant.dequantize(q, self.scales, zero, self.group_size)

    def dense_weight(self) -> torch.Tensor:
        w = self.dequantized_weight().to(self.scales.device, torch.float64)
        return w + self.lora_B.weight.double() @ self.lora_A.weight.double() if self.rank else w

    def forward(self, x):
        y = nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        if self.rank:
            y = y + self.lora_B(self.lora_A(x))
        return y

    def spec(self) -> dict:
        spec = {"kind": "quant", "bits": self.bits, "group_size": self.group_size}
        if self.rank:
            spec["rank"] = self.rank
        return spec

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, rank={self.rank}"
        )


COMPRESSED_MODULES = (LowRankLinear, QuantLinear)


def empty_module(spec: dict, in_features: int, out_features: int, bias: bool, dtype=None, device=None) -> nn.Module:
    kind = spec.get("kind")
    if kind == "lowrank":
        return LowRankLinear(in_features, out_features, spec["rank"], bias, dtype=dtype, device=device)
    if kind == "quant":
        return QuantLinear(
            in_features, out_features, spec["bits"], spec["group_size"], bias, spec.get("rank", 0), dtype, device
        )
    raise ValueError(f"unknown compressed module kind {kind!r} in checkpoint config")


@torch.no_grad()
def module_from_factors(factors, bias: torch.Tensor | None, dtype) -> nn.Module:
    """Build the replacement module for one compressed linear, weights cast to the model dtype."""
    m = factors.qweight.shape[0] if isinstance(factors, Quantized) else factors.B.shape[0]
    n = factors.in_features if isinstance(factors, Quantized) else factors.A.shape[1]
    module = empty_module(factors.spec(), n, m, bias is not None, dtype=dtype)
    if isinstance(factors, LowRank):
        module.A.weight.copy_(factors.A)
        module.B.weight.copy_(factors.B)
        if bias is not None:
            module.B.bias.copy_(bias)
        return module
    module.qweight.copy_(factors.qweight)
    module.qzeros.copy_(factors.qzeros)
    module.scales.copy_(factors.scales)
    if bias is not None:
        module.bias.copy_(bias)
    if factors.residual is not None:
        module.lora_A.weight.copy_(factors.residual.A)
        module.lora_B.weight.copy_(factors.residual.B)
    return module
