"""nn.Modules that replace nn.Linear after compression. Only modules here: the maths lives in methods/.

Parameter names are part of the checkpoint format (config.json's quantization_config records each module's
`spec`; `empty_module(spec, ...)` rebuilds the empty module so the state dict loads):
- LowRankLinear: `A.weight` (r, in), `B.weight` (out, r), `B.bias` (out) — y = B(A x) + bias.
- QuantLinear: buffers `qweight`, `qzeros` (int32, packed), `scales` (fp16); optional `bias`; optional EoRA
  residual `lora_A.weight`, `lora_B.weight` — y = dequant(W) x + bias + lora_B(lora_A x).
- LowRankSparseLinear: LowRankLinear's `A.weight`, `B.weight`, `B.bias`, plus parameter `S_values` and buffer
  `S_indices` (int16/int32) — y = B(A x) + bias + S x. Per-row layout: (out, k_row) both; total layout:
  values (nnz,), indices (2, nnz) = (rows, cols). With spec `format: bitmask`: buffer `S_mask` (uint8,
  (out, ⌈in/8⌉), compressor.factors.pack_mask) instead of `S_indices`, values in row-major order.
- QuantLowRankLinear: both factors as packed b-bit codes — buffers `A_qweight`, `A_qzeros`, `A_scales` (rank, in)
  and `B_qweight`, `B_qzeros`, `B_scales` (out, rank) in QuantLinear's format; optional `bias` — y = B̂(Â x) + bias.

Loading (`prepare_inference`, called by the loader) derives unsaved inference copies from those tensors: QuantLinear's
codes in a packed kernel's layout (compressor/kernels.py), LowRankSparseLinear's CSR or merged product, low-rank
factors with their transposes contiguous; `fuse_siblings` shares one A GEMM between low-rank siblings.

Every module's stored bytes are its state dict's tensors: floating ones in the checkpoint's dtype, except the
fp16 `*scales` of the packed formats, which stay fp16 (compressor.report.stored_bytes).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from compressor import kernels, quant
from compressor.factors import (LowRank, LowRankSparse, QuantLowRank, Quantized, factor_group_size, sparse_index_dtype,
                                unpack_mask)


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        self._shared: kernels.SharedInputA | None = None  # fuse_siblings: one A GEMM for q/k/v, gate/up
        self._register_state_dict_hook(kernels.contiguous_factors)

    def prepare(self) -> str:
        """Load time: keep A and B with their transposes contiguous — the same values with other strides, so no
        stored tensor changes (state_dict() hands out contiguous copies). F.linear(x, W) multiplies by Wᵀ; with Wᵀ
        contiguous a few rows times a thin factor take BLAS's faster path (SmolLM2 svd-llm-40 batch-1 decode, one CPU
        thread: ~1.5× dense against ~1.2× with row-major factors; scripts/bench_inference.py's "dense Wᵀ" row shows
        what the same layout does for the dense model)."""
        kernels.transpose_in_memory(self.A, self.B)
        return "transposed"

    def forward(self, x):
        shared = self._shared
        if shared is not None and not (torch.is_grad_enabled() and (x.requires_grad or self.A.weight.requires_grad)):
            h = shared.project(self, x)
            if h is not None:
                return self.B(h)
        return self.B(self.A(x))

    def kernel_bytes(self) -> int:
        """Bytes of this module's share of a fused A (fuse_siblings; 0 when not fused)."""
        return self._shared.nbytes() // len(self._shared.members) if self._shared is not None else 0

    def dense_weight(self) -> torch.Tensor:
        return self.B.weight.double() @ self.A.weight.double()

    def refinable_parameters(self) -> list[nn.Parameter]:
        """What block refinement (compressor/refine.py) may train: the factors, not the bias."""
        return [self.A.weight, self.B.weight]

    def spec(self) -> dict:
        return {"kind": "lowrank", "rank": self.rank}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@torch.no_grad()
def fuse_siblings(model: nn.Module, example: torch.Tensor | None = None) -> list[list[str]]:
    """Give the LowRankLinears that read the same input one shared A GEMM (kernels.SharedInputA). The siblings are
    found the way calibration finds them (compressor/stats.py): from which tensor each module receives in one forward of
    `example` (default: one token id 0), not from names. Changes no stored tensor. Returns the fused groups."""
    names = {m: n for n, m in model.named_modules() if type(m) is LowRankLinear}
    seen: list[tuple[torch.Tensor, LowRankLinear]] = []  # the tensors are kept alive so their identities stay unique
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((args[0], mod)) if args else None)
             for m in names]  # a module called with keyword arguments only is left unfused
    for m in names:
        m._shared = None
    try:
        device = next(model.parameters()).device
        model(example if example is not None else torch.zeros(1, 1, dtype=torch.long, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[int, list[LowRankLinear]] = {}
    for x, module in seen:
        members = groups.setdefault(id(x), [])
        if module not in members:
            members.append(module)
    fused = []
    for members in groups.values():
        if len(members) > 1 and len({(m.in_features, m.A.weight.dtype) for m in members}) == 1:
            shared = kernels.SharedInputA(members)
            for m in members:
                m._shared = shared
            fused.append([names[m] for m in members])
    return fused


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
        # The stored codes in a packed kernel's layout (compressor/kernels.py): derived, never saved (not a buffer).
        # use_kernel False: always the exact dequantise path (the fp32 reference the kernels are tested against).
        self._packed: kernels.Packed | None = None
        self._fallback = False
        self.use_kernel = True
        self._register_state_dict_hook(kernels.contiguous_factors)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not touch the fp16 scales (part of the packed format): a round trip through
        # bf16 would round them. Keep the originals and follow only the device change.
        scales, device = self.scales, self.qweight.device
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float16:
            self.scales = scales.to(self.scales.device)
        if self.qweight.device != device:  # the kernels' layouts differ per device: converted again on next forward
            self._packed, self._fallback = None, False
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new codes: the kernel layout is converted again from them
        super()._load_from_state_dict(*args, **kwargs)

    def prepare(self) -> str:
        """Convert the stored codes to a packed kernel's layout on their device, once (done at load time and again
        after a device change). Returns the path forward() takes: "int4", "int8", or "dequantize" (the per-forward
        fallback for layouts torch has no kernel for, e.g. 3-bit; warned about once per layout)."""
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
        """The EoRA residual only: the packed quantised weights stay as they are."""
        return [self.lora_A.weight, self.lora_B.weight] if self.rank else []

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
        """x·dequant(W)ᵀ + bias without a kernel, dequantising a block of output rows at a time so the temporaries
        stay under half the dense layer's bytes."""
        rows = kernels.fallback_rows(self.in_features, self.out_features, self.bits, x.element_size())
        parts = [nn.functional.linear(x, w.to(x.dtype)) for _, w in kernels.dequantized_chunks(
            self.qweight, self.qzeros, self.scales, self.bits, self.group_size, self.in_features, rows)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

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
        nnz: int | None = None, dtype=None, device=None, fmt: str = "indices",
    ):
        super().__init__()
        if (nnz_per_row is None) == (nnz is None):
            raise ValueError("LowRankSparseLinear needs exactly one of nnz_per_row or nnz")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.per_row = nnz_per_row is not None
        self.fmt = fmt
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        if self.per_row:
            shape, index_shape = (out_features, nnz_per_row), (out_features, nnz_per_row)
            index_dtype = sparse_index_dtype(in_features)
        else:
            shape, index_shape = (nnz,), (2, nnz)
            index_dtype = sparse_index_dtype(max(in_features, out_features))
        self.S_values = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self._fast: tuple | None = None  # (weights key, path, CSR S or merged W): derived at load time, never saved
        self._register_state_dict_hook(kernels.contiguous_factors)
        self.use_kernel = True  # False: the differentiable densify-per-forward reference path
        if fmt == "bitmask":
            mask_shape = (out_features, (in_features + 7) // 8)
            self.register_buffer("S_mask", torch.zeros(mask_shape, dtype=torch.uint8, device=device))
        elif fmt == "indices":
            self.register_buffer("S_indices", torch.zeros(index_shape, dtype=index_dtype, device=device))
        else:
            raise ValueError(f"unknown sparse format {fmt!r}")

    @property
    def nnz(self) -> int:
        return self.S_values.numel()

    def sparse_weight(self, dtype=None) -> torch.Tensor:
        """S as a dense (out, in) matrix."""
        dtype = dtype or self.S_values.dtype
        S = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.S_values.device)
        if self.fmt == "bitmask":
            S[unpack_mask(self.S_mask, self.in_features)] = self.S_values.to(dtype).reshape(-1)
            return S
        if self.per_row:
            return S.scatter_(1, self.S_indices.long(), self.S_values.to(dtype))
        return S.index_put_((self.S_indices[0].long(), self.S_indices[1].long()), self.S_values.to(dtype))

    def dense_weight(self) -> torch.Tensor:
        return self.B.weight.double() @ self.A.weight.double() + self.sparse_weight(torch.float64)

    def refinable_parameters(self) -> list[nn.Parameter]:
        """Factors and the kept sparse values (the sparsity pattern stays fixed)."""
        return [self.A.weight, self.B.weight, self.S_values]

    def _weights_key(self, x) -> tuple:
        # Checked on every forward: plain dict lookups instead of nn.Module.__getattr__ (that walk was 2.4 of the
        # 3.5 µs a check took, ~1 ms per SmolLM2 decode step). In-place updates bump _version; a replaced
        # parameter has another id.
        A, B = self._modules["A"]._parameters["weight"], self._modules["B"]._parameters["weight"]
        S = self._parameters["S_values"]
        return (x.device, x.dtype, A._version, B._version, S._version, id(A), id(B), id(S))

    def prepare(self, x=None) -> str:
        """Build the inference product once (load time; again when the weights, device or dtype change):
        "csr" — y = B(A x) + bias + S x with S in CSR; "merged" — one dense GEMM by W = B·A + S formed in fp64
        (see compressor.kernels.SPARSE_CSR_MAX_DENSITY for which and why). Changes no stored tensor."""
        like = x if x is not None else self.A.weight
        key = self._weights_key(like)
        if self._fast is not None and self._fast[0] == key:
            return self._fast[1]
        with torch.no_grad():
            path = kernels.sparse_path(self.nnz, self.out_features, self.in_features, like.device)
            if path == "csr":
                tensor = kernels.csr(self.sparse_weight(like.dtype))
                kernels.transpose_in_memory(self.A, self.B)
            else:  # with its transpose contiguous, like the low-rank factors (LowRankLinear.prepare)
                tensor = self.dense_weight().to(like.dtype).T.contiguous().T
        self._fast = (self._weights_key(like), path, tensor)  # after the transposition moved A and B
        return path

    def kernel_bytes(self) -> int:
        """Bytes of the inference copy (CSR S or merged W) held next to the stored tensors."""
        if self._fast is None:
            return 0
        t = self._fast[2]
        parts = [t.crow_indices(), t.col_indices(), t.values()] if t.layout == torch.sparse_csr else [t]
        return sum(p.numel() * p.element_size() for p in parts)

    def forward(self, x):
        training = torch.is_grad_enabled() and (x.requires_grad or self._parameters["S_values"].requires_grad)
        if self.use_kernel and not training:
            fast = self._fast
            path = fast[1] if fast is not None and fast[0] == self._weights_key(x) else self.prepare(x)
            tensor = self._fast[2]
            if path == "merged":
                return nn.functional.linear(x, tensor, self._modules["B"]._parameters["bias"])
            y = self.B(self.A(x))
            return y + kernels.csr_linear(x, tensor) if self.nnz else y
        y = self.B(self.A(x))
        if self.nnz:
            # Training (or use_kernel False): S is densified on every call — exact on any device and dtype and
            # differentiable, but a dense weight's memory and a dense matmul per forward.
            y = y + nn.functional.linear(x, self.sparse_weight(x.dtype))
        return y

    def spec(self) -> dict:
        spec = {"kind": "lowrank_sparse", "rank": self.rank}
        if self.per_row:
            spec["nnz_per_row"] = self.S_values.shape[1]
        else:
            spec["nnz"] = self.nnz
        if self.fmt != "indices":
            spec["format"] = self.fmt
        return spec

    def extra_repr(self) -> str:
        sparse = f"nnz_per_row={self.S_values.shape[1]}" if self.per_row else f"nnz={self.nnz}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, {sparse}, "
                f"format={self.fmt}")


def _register_packed(module: nn.Module, prefix: str, rows: int, cols: int, bits: int, group_size: int, device):
    groups = quant.num_groups(cols, group_size)
    i32 = dict(dtype=torch.int32, device=device)
    module.register_buffer(f"{prefix}qweight", torch.zeros(rows, quant.packed_words(cols, bits), **i32))
    module.register_buffer(f"{prefix}qzeros", torch.zeros(rows, quant.packed_words(groups, bits), **i32))
    module.register_buffer(f"{prefix}scales", torch.ones(rows, groups, dtype=torch.float16, device=device))


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
        """None: the factors are integer codes (block refinement cannot train them)."""
        return []

    def forward(self, x):
        A, B = self.factors()
        return nn.functional.linear(nn.functional.linear(x, A.to(x.dtype)), B.to(x.dtype), self.bias)

    def spec(self) -> dict:
        return {"kind": "lowrank_quant", "rank": self.rank, "bits": self.bits, "group_size": self.group_size}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}")


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
    densify S; slow). Returns {path: module count}."""
    paths: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.use_kernel = use_kernels
            module._packed = module._packed if use_kernels else None
            path = module.prepare() if use_kernels else "dequantize"
        elif isinstance(module, LowRankSparseLinear):
            module._fast, module.use_kernel = None, use_kernels
            path = module.prepare() if use_kernels else "densify"
        elif type(module) is LowRankLinear and use_kernels:
            path = module.prepare()
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
