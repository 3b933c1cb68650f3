"""What a method returns: plain tensor containers, one per compressed matrix. No modules, no I/O.

Every container knows its dense reconstruction (for error measurement), how many parameters it stores, and a
JSON-able `spec` from which `modules.empty_module` rebuilds an empty module of the right shape at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor import quant


@dataclass
class LowRank:
    """W ≈ B @ A with A: (r, n) and B: (m, r)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> torch.Tensor:
        return self.B.double() @ self.A.double()

    def num_params(self) -> int:
        return self.A.numel() + self.B.numel()

    def spec(self) -> dict:
        return {"kind": "lowrank", "rank": self.rank}


@dataclass
class Quantized:
    """Packed b-bit codes with fp16 per-group scales and packed zero points, plus an optional low-rank
    residual path (EoRA) computed in full precision next to the quantized product."""

    qweight: torch.Tensor  # (m, words) int32
    scales: torch.Tensor  # (m, groups) fp16
    qzeros: torch.Tensor  # (m, words) int32
    bits: int
    group_size: int
    in_features: int
    residual: LowRank | None = None

    @classmethod
    def from_codes(cls, q, scale, zero, bits, group_size, residual=None) -> "Quantized":
        return cls(
            qweight=quant.pack(q, bits),
            scales=scale.half(),
            qzeros=quant.pack(zero.to(torch.int32), bits),
            bits=bits,
            group_size=group_size,
            in_features=q.shape[1],
            residual=residual,
        )

    def dequantized(self) -> torch.Tensor:
        groups = self.scales.shape[1]
        q = quant.unpack(self.qweight, self.bits, self.in_features)
        zero = quant.unpack(self.qzeros, self.bits, groups)
        return quant.dequantize(q, self.scales, zero, self.group_size)

    def dense(self) -> torch.Tensor:
        w = self.dequantized().double()
        return w + self.residual.dense() if self.residual is not None else w

    def num_params(self) -> int:
        """Stored values: one per weight (at `bits` bits) + scales + zeros + residual factors."""
        m, n = self.qweight.shape[0], self.in_features
        extra = self.residual.num_params() if self.residual is not None else 0
        return m * n + 2 * self.scales.numel() + extra

    def spec(self) -> dict:
        spec = {"kind": "quant", "bits": self.bits, "group_size": self.group_size}
        if self.residual is not None:
            spec["rank"] = self.residual.rank
        return spec


@dataclass
class Decomposition:
    """A method's answer for a batch of same-shape matrices: one container per matrix, plus diagnostics."""

    factors: list
    clamped_eigenvalues: int = 0


def sparse_index_dtype(size: int) -> torch.dtype:
    """Smallest signed integer dtype that holds indices 0..size-1 (safetensors has no unsigned 16-bit type)."""
    return torch.int16 if size - 1 <= torch.iinfo(torch.int16).max else torch.int32


@dataclass
class LowRankSparse:
    """W ≈ B @ A + S with A: (r, n), B: (m, r) and a sparse S stored as values + indices.

    per_row: `values` (m, k_row) and `indices` (m, k_row) column indices — row i holds S[i, indices[i]].
    total:   `values` (nnz,) and `indices` (2, nnz) = (rows, cols), row-major order.
    Indices are int16 when the indexed dimensions fit (< 32768), else int32."""

    A: torch.Tensor
    B: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    in_features: int
    per_row: bool = True

    @classmethod
    def from_indices(cls, A, B, values, indices, *, in_features: int, per_row: bool = True) -> "LowRankSparse":
        m = B.shape[0]
        dtype = sparse_index_dtype(in_features if per_row else max(m, in_features))
        return cls(A=A, B=B, values=values, indices=indices.to(dtype), in_features=in_features, per_row=per_row)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def sparse_dense(self) -> torch.Tensor:
        m, n = self.B.shape[0], self.in_features
        S = torch.zeros(m, n, dtype=torch.float64, device=self.values.device)
        if self.per_row:
            return S.scatter_(1, self.indices.long(), self.values.double())
        return S.index_put_((self.indices[0].long(), self.indices[1].long()), self.values.double())

    def dense(self) -> torch.Tensor:
        return self.B.double() @ self.A.double() + self.sparse_dense()

    def num_params(self) -> int:
        """Stored values r(m + n) + nnz; the int16/int32 indices are not parameters (they count in bytes)."""
        return self.A.numel() + self.B.numel() + self.nnz

    def spec(self) -> dict:
        if self.per_row:
            return {"kind": "lowrank_sparse", "rank": self.rank, "nnz_per_row": self.values.shape[1]}
        return {"kind": "lowrank_sparse", "rank": self.rank, "nnz": self.nnz}
