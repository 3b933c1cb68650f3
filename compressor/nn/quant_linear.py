"""The quantised replacements for nn.Linear: QuantLinear (packed b-bit weight, optional EoRA residual) and
QuantLowRankLinear (both low-rank factors as packed b-bit codes).

Their tensor names are the checkpoint format, listed in compressor/nn/modules.py (the public entry point, which re-exports
these). QuantLinear.prepare() converts the stored codes to a packed kernel's layout (compressor/nn/kernels.py) at load
time; the fp16 `*scales` stay fp16 whatever dtype the model is cast to, being part of the packed format.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from compressor import quant
from compressor.nn import kernels
from compressor.nn.factors import factor_group_size


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
        # The stored codes in a packed kernel's layout (compressor/nn/kernels.py): derived, never saved (not a buffer).
        # use_kernel False: always the exact dequantise path (the fp32 reference the kernels are tested against).
        self._packed: kernels.Packed | None = None
        self._fallback = False
        self.use_kernel = True
        self._register_state_dict_hook(kernels.contiguous_factors)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not touch the fp16 scales (part of the packed format): a round trip through
        # bf16 would round them. Keep the originals and follow only the device change.
        scales = self.scales
        # The kernel layout is a copy on the old device: kept, a layer sent to the meta device (--low-memory) would
        # still hold it. Dropped on every move or cast; the next forward converts again where the codes now are.
        self._packed, self._fallback = None, False
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float16:
            self.scales = scales.to(self.scales.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new codes: the kernel layout is converted again from them
        super()._load_from_state_dict(*args, **kwargs)

    def prepare(self) -> str:
        """Convert the stored codes to a packed kernel's layout on their device, once (done at load time and again
        after a device change). Returns the path forward() takes: "int4", "int8", or "dequantize" (the per-forward
        fallback for layouts torch has no kernel for, e.g. grouped 5-/6-bit; warned about once per layout). 2- and 3-bit
        codes run on the int4 kernel, per-row 5- to 7-bit ones on the int8 kernel (kernels.kernel_kind)."""
        if self._packed is not None:
            return self._packed.kind
        if self.rank:
            kernels.transpose_in_memory(self.lora_A, self.lora_B)  # EoRA's thin factors, as LowRankLinear's
        device = self.qweight.device
        reason = kernels.fallback_reason(self.bits, self.group_size, self.in_features, self.out_features, device)
        if reason is None:
            self._packed = kernels.pack(self.qweight, self.qzeros, self.scales, self.bits, self.group_size,
                                        self.in_features, device)
            return self._packed.kind
        warnings.warn(f"QuantLinear: {reason}; these layers dequantise their weight on every forward (slow)",
                      stacklevel=2)
        self._fallback = True
        return "dequantize"

    def kernel_bytes(self) -> int:
        """Bytes of the kernel-layout copy held next to the stored codes (0 on the fallback path)."""
        return self._packed.nbytes() if self._packed is not None else 0

    def dequantized_weight(self) -> torch.Tensor:
        q = quant.unpack(self.qweight, self.bits, self.in_features)
        zero = quant.unpack(self.qzeros, self.bits, self.scales.shape[1])
        return quant.dequantize(q, self.scales, zero, self.group_size)

    def dense_weight(self) -> torch.Tensor:
        w = self.dequantized_weight().to(self.scales.device, torch.float64)
        return w + self.lora_B.weight.double() @ self.lora_A.weight.double() if self.rank else w

    def refinable_parameters(self) -> list[nn.Parameter]:
        """The EoRA residual (Adam); the codes and scales are refined on their grid by compressor/pipeline/refine_quant.py."""
        return [self.lora_A.weight, self.lora_B.weight] if self.rank else []

    def write_codes(self, q: torch.Tensor, zero: torch.Tensor, scales: torch.Tensor, prefix: str = "") -> None:
        """Store new codes (out, in), zero points and fp16 scales (out, groups) in place, in the same packed format
        (block refinement); the kernel layout is converted again from them on the next forward."""
        write_packed(self, prefix, q, zero, scales, self.bits)
        self._packed, self._fallback = None, False

    def forward(self, x):
        # The packed kernels have no backward: with gradients flowing through x (block refinement of an earlier
        # module), and on layouts without a kernel, the weight is dequantised per forward.
        kernel = self.use_kernel and not (torch.is_grad_enabled() and x.requires_grad) and not self._fallback
        if kernel and (self._packed is None or self._packed.weight.device != x.device):
            kernel = self.prepare() != "dequantize"
        if kernel:
            y = kernels.matmul(x, self._packed)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            y = self.dequantized_forward(x)
        if self.rank:
            y = y + self.lora_B(self.lora_A(x))
        return y

    def dequantized_forward(self, x):
        """x·dequant(W)ᵀ + bias without a kernel: the weight is dequantised a block of output rows at a time (the
        unpacking temporaries stay under half the dense layer's bytes) into one dense W in x's dtype, then ONE
        F.linear(x, W, bias) — the product a plain nn.Linear (a serving export's dequantised layer) computes, so
        the two round alike. Per-block products rounded differently at odd block sizes (5.7e-6 in the demo model's
        logits)."""
        rows = kernels.fallback_rows(self.in_features, self.out_features, self.bits, x.element_size())
        w = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=self.qweight.device)
        for block, part in kernels.dequantized_chunks(self.qweight, self.qzeros, self.scales, self.bits,
                                                      self.group_size, self.in_features, rows):
            w[block] = part
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, w, bias)

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


def _register_packed(module: nn.Module, prefix: str, rows: int, cols: int, bits: int, group_size: int, device):
    groups = quant.num_groups(cols, group_size)
    i32 = dict(dtype=torch.int32, device=device)
    module.register_buffer(f"{prefix}qweight", torch.zeros(rows, quant.packed_words(cols, bits), **i32))
    module.register_buffer(f"{prefix}qzeros", torch.zeros(rows, quant.packed_words(groups, bits), **i32))
    module.register_buffer(f"{prefix}scales", torch.ones(rows, groups, dtype=torch.float16, device=device))


def write_packed(module: nn.Module, prefix: str, q: torch.Tensor, zero: torch.Tensor, scales: torch.Tensor, bits: int):
    if int(q.min()) < 0 or int(q.max()) >= 2**bits or int(zero.min()) < 0 or int(zero.max()) >= 2**bits:
        raise ValueError(f"codes outside [0, {2**bits - 1}]")
    with torch.no_grad():
        getattr(module, f"{prefix}qweight").copy_(quant.pack(q, bits))
        getattr(module, f"{prefix}qzeros").copy_(quant.pack(zero, bits))
        getattr(module, f"{prefix}scales").copy_(scales.to(torch.float16))


def _unpacked(module: nn.Module, prefix: str, cols: int, bits: int, group_size: int) -> torch.Tensor:
    scales = getattr(module, f"{prefix}scales")
    q = quant.unpack(getattr(module, f"{prefix}qweight"), bits, cols)
    zero = quant.unpack(getattr(module, f"{prefix}qzeros"), bits, scales.shape[1])
    return quant.dequantize(q, scales, zero, group_size)


class QuantLowRankLinear(nn.Module):
    """Low rank with both factors quantised (`factor_bits`): y = B̂ (Â x) + bias, each factor dequantised on the fly
    (like QuantLinear: exact and simple, not a fast kernel). `group_size` None: one scale per factor row."""

    def __init__(self, in_features, out_features, rank: int, bits: int, group_size: int | None, bias: bool,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group_size = bits, group_size
        self._gA, self._gB = factor_group_size(group_size, in_features), factor_group_size(group_size, rank)
        _register_packed(self, "A_", rank, in_features, bits, self._gA, device)
        _register_packed(self, "B_", out_features, rank, bits, self._gB, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def _apply(self, fn, recurse=True):
        # As QuantLinear: the fp16 scales are part of the packed format; a bf16 round trip would round them.
        kept = {name: getattr(self, name) for name in ("A_scales", "B_scales")}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            if getattr(self, name).dtype != torch.float16:
                setattr(self, name, original.to(getattr(self, name).device))
        return self

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Â (r, n), B̂ (m, r)) dequantised, fp32."""
        return (_unpacked(self, "A_", self.in_features, self.bits, self._gA),
                _unpacked(self, "B_", self.rank, self.bits, self._gB))

    def dense_weight(self) -> torch.Tensor:
        A, B = self.factors()
        return B.double() @ A.double()

    def refinable_parameters(self) -> list[nn.Parameter]:
        """None for Adam: the factors are integer codes, refined on their grid by compressor/pipeline/refine_quant.py."""
        return []

    def write_codes(self, q: torch.Tensor, zero: torch.Tensor, scales: torch.Tensor, prefix: str) -> None:
        """Store factor `prefix` ("A_" or "B_")'s new codes, zero points and fp16 scales in place (block refinement)."""
        write_packed(self, prefix, q, zero, scales, self.bits)

    def forward(self, x):
        A, B = self.factors()
        return nn.functional.linear(nn.functional.linear(x, A.to(x.dtype)), B.to(x.dtype), self.bias)

    def spec(self) -> dict:
        return {"kind": "lowrank_quant", "rank": self.rank, "bits": self.bits, "group_size": self.group_size}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}")
