"""nn.Modules that replace nn.Linear after compression. Only modules here: the maths lives in methods/.

Parameter names are part of the checkpoint format (config.json's quantization_config records each module's
`spec`; `empty_module(spec, ...)` rebuilds the empty module so the state dict loads):
- LowRankLinear: `A.weight` (r, in), `B.weight` (out, r), `B.bias` (out) — y = B(A x) + bias.
- QuantLinear: buffers `qweight`, `qzeros` (int32, packed), `scales` (fp16); optional `bias`; optional EoRA
  residual `lora_A.weight`, `lora_B.weight` — y = dequant(W) x + bias + lora_B(lora_A x).
- LowRankSparseLinear: LowRankLinear's `A.weight`, `B.weight`, `B.bias`, plus parameter `S_values` and buffer
  `S_indices` (int16/int32) — y = B(A x) + bias + S x. Per-row layout: (out, k_row) both; total layout:
  values (nnz,), indices (2, nnz) = (rows, cols).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor import quant
from compressor.factors import LowRank, LowRankSparse, Quantized, sparse_index_dtype


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

    def refinable_parameters(self) -> list[nn.Parameter]:
        """What block refinement (compressor/refine.py) may train: the factors, not the bias."""
        return [self.A.weight, self.B.weight]

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
        # model.to(bfloat16) must not touch the fp16 scales (part of the packed format): a round trip through
        # bf16 would round them. Keep the originals and follow only the device change.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float16:
            self.scales = scales.to(self.scales.device)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        q = quant.unpack(self.qweight, self.bits, self.in_features)
        zero = quant.unpack(self.qzeros, self.bits, self.scales.shape[1])
        return quant.dequantize(q, self.scales, zero, self.group_size)

    def dense_weight(self) -> torch.Tensor:
        w = self.dequantized_weight().to(self.scales.device, torch.float64)
        return w + self.lora_B.weight.double() @ self.lora_A.weight.double() if self.rank else w

    def refinable_parameters(self) -> list[nn.Parameter]:
        """The EoRA residual only: the packed quantised weights stay as they are."""
        return [self.lora_A.weight, self.lora_B.weight] if self.rank else []

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


class LowRankSparseLinear(nn.Module):
    def __init__(
        self, in_features, out_features, rank: int, bias: bool, nnz_per_row: int | None = None,
        nnz: int | None = None, dtype=None, device=None,
    ):
        super().__init__()
        if (nnz_per_row is None) == (nnz is None):
            raise ValueError("LowRankSparseLinear needs exactly one of nnz_per_row or nnz")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.per_row = nnz_per_row is not None
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        if self.per_row:
            shape, index_shape = (out_features, nnz_per_row), (out_features, nnz_per_row)
            index_dtype = sparse_index_dtype(in_features)
        else:
            shape, index_shape = (nnz,), (2, nnz)
            index_dtype = sparse_index_dtype(max(in_features, out_features))
        self.S_values = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("S_indices", torch.zeros(index_shape, dtype=index_dtype, device=device))

    @property
    def nnz(self) -> int:
        return self.S_values.numel()

    def sparse_weight(self, dtype=None) -> torch.Tensor:
        """S as a dense (out, in) matrix."""
        dtype = dtype or self.S_values.dtype
        S = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.S_values.device)
        if self.per_row:
            return S.scatter_(1, self.S_indices.long(), self.S_values.to(dtype))
        return S.index_put_((self.S_indices[0].long(), self.S_indices[1].long()), self.S_values.to(dtype))

    def dense_weight(self) -> torch.Tensor:
        return self.B.weight.double() @ self.A.weight.double() + self.sparse_weight(torch.float64)

    def refinable_parameters(self) -> list[nn.Parameter]:
        """Factors and the kept sparse values (the sparsity pattern stays fixed)."""
        return [self.A.weight, self.B.weight, self.S_values]

    def forward(self, x):
        y = self.B(self.A(x))
        if self.nnz:
            # S is densified (scatter into an out×in matrix) on every call: simple and exact on any device and
            # dtype, but it costs a dense weight's memory and a dense matmul per forward — the checkpoint is
            # small, the runtime is not faster. A CSR/sparse kernel would be the speed path.
            y = y + nn.functional.linear(x, self.sparse_weight(x.dtype))
        return y

    def spec(self) -> dict:
        spec = {"kind": "lowrank_sparse", "rank": self.rank}
        if self.per_row:
            spec["nnz_per_row"] = self.S_values.shape[1]
        else:
            spec["nnz"] = self.nnz
        return spec

    def extra_repr(self) -> str:
        sparse = f"nnz_per_row={self.S_values.shape[1]}" if self.per_row else f"nnz={self.nnz}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, {sparse}"


COMPRESSED_MODULES = (LowRankLinear, QuantLinear, LowRankSparseLinear)
KINDS = ("lowrank", "quant", "lowrank_sparse")  # every `spec()["kind"]` empty_module can rebuild


def empty_module(spec: dict, in_features: int, out_features: int, bias: bool, dtype=None, device=None) -> nn.Module:
    kind = spec.get("kind")
    if kind == "lowrank":
        return LowRankLinear(in_features, out_features, spec["rank"], bias, dtype=dtype, device=device)
    if kind == "quant":
        return QuantLinear(
            in_features, out_features, spec["bits"], spec["group_size"], bias, spec.get("rank", 0), dtype, device
        )
    if kind == "lowrank_sparse":
        return LowRankSparseLinear(
            in_features, out_features, spec["rank"], bias, spec.get("nnz_per_row"), spec.get("nnz"), dtype, device
        )
    raise ValueError(f"unknown compressed module kind {kind!r} in checkpoint config")


@torch.no_grad()
def module_from_factors(factors, bias: torch.Tensor | None, dtype) -> nn.Module:
    """Build the replacement module for one compressed linear, weights cast to the model dtype."""
    m = factors.qweight.shape[0] if isinstance(factors, Quantized) else factors.B.shape[0]
    n = factors.in_features if isinstance(factors, Quantized) else factors.A.shape[1]
    module = empty_module(factors.spec(), n, m, bias is not None, dtype=dtype)
    if isinstance(factors, LowRankSparse):
        module.A.weight.copy_(factors.A)
        module.B.weight.copy_(factors.B)
        module.S_values.copy_(factors.values)
        module.S_indices.copy_(factors.indices)
        if bias is not None:
            module.B.bias.copy_(bias)
        return module
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
