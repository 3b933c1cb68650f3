"""The low-rank replacements for nn.Linear: LowRankLinear (y = B(A x) + bias) and LowRankSparseLinear (+ S x).

Their tensor names are the checkpoint format, listed in compressor/nn/modules.py (the public entry point, which re-exports
these). Their prepare() methods derive unsaved inference copies at load time — factors with their transposes
contiguous, S as CSR or merged into one dense weight — and `fuse_siblings` shares one A GEMM between siblings.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.nn import kernels
from compressor.nn.factors import sparse_index_dtype, unpack_mask


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

    def _apply(self, fn, recurse=True):
        # The fused A (fuse_siblings) is a copy on the old device and dtype: a move or cast drops it (for every
        # sibling), the next forward concatenates again. The transposed strides (prepare) are the parameters'
        # own, no copy: .to() keeps them.
        if self._shared is not None:
            self._shared.release()
        return super()._apply(fn, recurse)

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
        """What block refinement (compressor/pipeline/refine.py) may train: the factors, not the bias."""
        return [self.A.weight, self.B.weight]

    def spec(self) -> dict:
        return {"kind": "lowrank", "rank": self.rank}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@torch.no_grad()
def fuse_siblings(model: nn.Module, example: torch.Tensor | None = None) -> list[list[str]]:
    """Give the LowRankLinears that read the same input one shared A GEMM (kernels.SharedInputA). The siblings are
    found the way calibration finds them (compressor/pipeline/stats.py): from which tensor each module receives in one forward of
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
        (see compressor.nn.kernels.SPARSE_CSR_MAX_DENSITY for which and why). Changes no stored tensor."""
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

    def _apply(self, fn, recurse=True):
        # The CSR S or merged W is a copy on the old device: kept, a layer sent to the meta device (--low-memory)
        # or back to the offload device would still hold it. Dropped on every move or cast; the next forward
        # builds it again where the weights now are.
        self._fast = None
        return super()._apply(fn, recurse)

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
