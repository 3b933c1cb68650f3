"""nn.Modules that replace nn.Linear after compression — the public entry point. Only modules here: the maths lives
in methods/. The classes live in compressor/nn/lowrank_linear.py and compressor/nn/quant_linear.py; this module re-exports
them and holds what spans every kind: rebuilding a module from its spec or factors, load-time preparation, bytes.

Parameter names are part of the checkpoint format (config.json's quantization_config records each module's
`spec`; `empty_module(spec, ...)` rebuilds the empty module so the state dict loads):
- LowRankLinear: `A.weight` (r, in), `B.weight` (out, r), `B.bias` (out) — y = B(A x) + bias.
- QuantLinear: buffers `qweight`, `qzeros` (int32, packed), `scales` (fp16); optional `bias`; optional EoRA
  residual `lora_A.weight`, `lora_B.weight` — y = dequant(W) x + bias + lora_B(lora_A x).
- LowRankSparseLinear: LowRankLinear's `A.weight`, `B.weight`, `B.bias`, plus parameter `S_values` and buffer
  `S_indices` (int16/int32) — y = B(A x) + bias + S x. Per-row layout: (out, k_row) both; total layout:
  values (nnz,), indices (2, nnz) = (rows, cols). With spec `format: bitmask`: buffer `S_mask` (uint8,
  (out, ⌈in/8⌉), compressor.nn.factors.pack_mask) instead of `S_indices`, values in row-major order.
- QuantLowRankLinear: both factors as packed b-bit codes — buffers `A_qweight`, `A_qzeros`, `A_scales` (rank, in)
  and `B_qweight`, `B_qzeros`, `B_scales` (out, rank) in QuantLinear's format; optional `bias` — y = B̂(Â x) + bias.

Loading (`prepare_inference`, called by the loader) derives unsaved inference copies from those tensors: QuantLinear's
codes in a packed kernel's layout (compressor/nn/kernels.py), LowRankSparseLinear's CSR or merged product, low-rank
factors with their transposes contiguous; `fuse_siblings` shares one A GEMM between low-rank siblings.

Every module's stored bytes are its state dict's tensors: floating ones in the checkpoint's dtype, except the
fp16 `*scales` of the packed formats, which stay fp16 (stored_bytes).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.nn import kernels
from compressor.nn.factors import LowRank, LowRankSparse, QuantLowRank, Quantized
from compressor.nn.lowrank_linear import LowRankLinear, LowRankSparseLinear, fuse_siblings
from compressor.nn.quant_linear import QuantLinear, QuantLowRankLinear

__all__ = [
    "COMPRESSED_MODULES", "KINDS", "LowRankLinear", "LowRankSparseLinear", "QuantLinear", "QuantLowRankLinear",
    "empty_module", "fuse_siblings", "module_from_factors", "prepare_inference", "stored_bytes",
]


def stored_bytes(module: nn.Module, float_dtype: torch.dtype | None = None) -> int:
    """Bytes `module`'s state dict takes in a checkpoint: floating tensors in `float_dtype` (the checkpoint's dtype;
    None: as they are) except the fp16 `*scales` of the packed formats, which keep their dtype; integer codes,
    indices and masks as they are."""
    total = 0
    for name, t in module.state_dict().items():
        size = t.element_size()
        if float_dtype is not None and t.is_floating_point() and not name.endswith("scales"):
            size = torch.empty((), dtype=float_dtype).element_size()
        total += t.numel() * size
    return total


def prepare_inference(model: nn.Module, *, use_kernels: bool = True) -> dict[str, int]:
    """Load-time conversion for fast forwards: each QuantLinear's codes to a packed kernel's layout (or its
    fallback, warned about once); each LowRankSparseLinear's sparse product (CSR or merged, see its prepare());
    each LowRankLinear's factors transposed in memory (see its prepare()).
    Changes no stored tensor. `use_kernels=False`: the exact per-forward reference paths instead (dequantise;
    densify S; slow), with every factor row-major as stored, so a product rounds as the same plain nn.Linear's
    would (what a serving export's base + PEFT adapter computes). Returns {path: module count}."""
    paths: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.use_kernel = use_kernels
            module._packed = module._packed if use_kernels else None
            if not use_kernels and module.rank:
                kernels.row_major(module.lora_A, module.lora_B)
            path = module.prepare() if use_kernels else "dequantize"
        elif isinstance(module, LowRankSparseLinear):
            module._fast, module.use_kernel = None, use_kernels
            if not use_kernels:
                kernels.row_major(module.A, module.B)
            path = module.prepare() if use_kernels else "densify"
        elif type(module) is LowRankLinear:
            if not use_kernels:
                kernels.row_major(module.A, module.B)
            path = module.prepare() if use_kernels else "row-major"
        else:
            continue
        paths[path] = paths.get(path, 0) + 1
    return paths


COMPRESSED_MODULES = (LowRankLinear, QuantLinear, LowRankSparseLinear, QuantLowRankLinear)
KINDS = ("lowrank", "quant", "lowrank_sparse", "lowrank_quant")  # every `spec()["kind"]` empty_module can rebuild


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
            in_features, out_features, spec["rank"], bias, spec.get("nnz_per_row"), spec.get("nnz"), dtype, device,
            spec.get("format", "indices"),
        )
    if kind == "lowrank_quant":
        return QuantLowRankLinear(in_features, out_features, spec["rank"], spec["bits"], spec["group_size"], bias,
                                  dtype, device)
    raise ValueError(f"unknown compressed module kind {kind!r} in checkpoint config")


@torch.no_grad()
def module_from_factors(factors, bias: torch.Tensor | None, dtype) -> nn.Module:
    """Build the replacement module for one compressed linear, weights cast to the model dtype."""
    if isinstance(factors, QuantLowRank):
        m, n = factors.B.qweight.shape[0], factors.A.in_features
    elif isinstance(factors, Quantized):
        m, n = factors.qweight.shape[0], factors.in_features
    else:
        m, n = factors.B.shape[0], factors.A.shape[1]
    module = empty_module(factors.spec(), n, m, bias is not None, dtype=dtype)
    if isinstance(factors, QuantLowRank):
        for prefix, q in (("A_", factors.A), ("B_", factors.B)):
            for part in ("qweight", "qzeros", "scales"):
                getattr(module, prefix + part).copy_(getattr(q, part))
        if bias is not None:
            module.bias.copy_(bias)
        return module
    if isinstance(factors, LowRankSparse):
        module.A.weight.copy_(factors.A)
        module.B.weight.copy_(factors.B)
        module.S_values.copy_(factors.values)
        (module.S_mask if factors.fmt == "bitmask" else module.S_indices).copy_(factors.indices)
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
