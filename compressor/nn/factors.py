"""What a method returns: plain tensor containers, one per compressed matrix. No modules, no I/O.

Every container knows its dense reconstruction (for error measurement), how many parameters it stores, and a
JSON-able `spec` from which `modules.empty_module` rebuilds an empty module of the right shape at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
class QuantLowRank:
    """W ≈ B̂ Â with both factors stored as packed b-bit codes (`Quantized`, no residual): Â (r, n) grouped along
    its n input columns, B̂ (m, r) along its r columns. `group_size` None: one scale per row of each factor."""

    A: Quantized
    B: Quantized
    group_size: int | None

    @property
    def rank(self) -> int:
        return self.A.qweight.shape[0]

    @property
    def bits(self) -> int:
        return self.A.bits

    def dense(self) -> torch.Tensor:
        return self.B.dequantized().double() @ self.A.dequantized().double()

    def num_params(self) -> int:
        """Stored values: r(m + n) codes plus every scale and zero point."""
        return self.A.num_params() + self.B.num_params()

    def spec(self) -> dict:
        return {"kind": "lowrank_quant", "rank": self.rank, "bits": self.bits, "group_size": self.group_size}


def factor_group_size(group_size: int | None, columns: int) -> int:
    """The group size used for a factor with `columns` input columns (None: the whole row)."""
    return max(columns, 1) if group_size is None else group_size


@dataclass
class Decomposition:
    """A method's answer for a batch of same-shape matrices: one container per matrix, plus diagnostics."""

    factors: list
    clamped_eigenvalues: int = 0


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool (m, n) -> uint8 (m, ceil(n/8)), bit j % 8 of byte j // 8 holding column j (little-endian bits)."""
    m, n = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-n) % 8)).reshape(m, -1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_mask`: uint8 (m, ceil(n/8)) -> bool (m, n)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().reshape(packed.shape[0], -1)[:, :n]


def sparse_index_dtype(size: int) -> torch.dtype:
    """Smallest signed integer dtype that holds indices 0..size-1 (safetensors has no unsigned 16-bit type)."""
    return torch.int16 if size - 1 <= torch.iinfo(torch.int16).max else torch.int32


def sparse_format_bytes(fmt: str, m: int, n: int, nnz: int, per_row: bool) -> int:
    """Bytes the sparse part's *positions* take (its values not included): int16/int32 column indices (row mode),
    (row, col) index pairs (total mode), or a bitmask of m·⌈n/8⌉ bytes that does not grow with nnz."""
    if fmt == "bitmask":
        return m * math.ceil(n / 8)
    size = torch.empty((), dtype=sparse_index_dtype(n if per_row else max(m, n))).element_size()
    return nnz * size * (1 if per_row else 2)


@dataclass
class LowRankSparse:
    """W ≈ B @ A + S with A: (r, n), B: (m, r) and a sparse S stored as values + positions.

    fmt "indices", per_row: `values` (m, k_row) and `indices` (m, k_row) column indices — row i holds
                            S[i, indices[i]];
                   total:   `values` (nnz,) and `indices` (2, nnz) = (rows, cols), row-major order.
                   Indices are int16 when the indexed dimensions fit (< 32768), else int32.
    fmt "bitmask": `indices` is the uint8 bitmask (m, ⌈n/8⌉) of the non-zero positions (`pack_mask`) and `values`
                   the non-zeros in row-major order ((m, k_row) per row, (nnz,) in total) — 1 bit per weight
                   instead of 16 per kept entry: the smaller format once more than 1/16 of the entries are kept."""

    A: torch.Tensor
    B: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    in_features: int
    per_row: bool = True
    fmt: str = "indices"

    @classmethod
    def from_indices(cls, A, B, values, indices, *, in_features: int, per_row: bool = True,
                     fmt: str = "indices") -> "LowRankSparse":
        """From (column or (row, col)) indices; `fmt` "bitmask" converts them to a mask."""
        m = B.shape[0]
        dtype = sparse_index_dtype(in_features if per_row else max(m, in_features))
        out = cls(A=A, B=B, values=values, indices=indices.to(dtype), in_features=in_features, per_row=per_row)
        return out.to_bitmask() if fmt == "bitmask" else out

    def to_bitmask(self) -> "LowRankSparse":
        if self.fmt == "bitmask":
            return self
        m, n = self.B.shape[0], self.in_features
        mask = torch.zeros(m, n, dtype=torch.bool, device=self.values.device)
        S = torch.zeros(m, n, dtype=self.values.dtype, device=self.values.device)
        if self.per_row:
            idx = self.indices.long()
            mask.scatter_(1, idx, True)
            S.scatter_(1, idx, self.values)
        else:
            rows, cols = self.indices.long()
            mask[rows, cols] = True
            S[rows, cols] = self.values
        values = S[mask].reshape(self.values.shape)  # row-major, columns ascending within each row
        return replace(self, values=values, indices=pack_mask(mask), fmt="bitmask")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def sparse_dense(self) -> torch.Tensor:
        m, n = self.B.shape[0], self.in_features
        S = torch.zeros(m, n, dtype=torch.float64, device=self.values.device)
        if self.fmt == "bitmask":
            S[unpack_mask(self.indices, n)] = self.values.double().reshape(-1)
            return S
        if self.per_row:
            return S.scatter_(1, self.indices.long(), self.values.double())
        return S.index_put_((self.indices[0].long(), self.indices[1].long()), self.values.double())

    def dense(self) -> torch.Tensor:
        return self.B.double() @ self.A.double() + self.sparse_dense()

    def num_params(self) -> int:
        """Stored values r(m + n) + nnz; the positions (indices or bitmask) are not parameters (they count in
        bytes)."""
        return self.A.numel() + self.B.numel() + self.nnz

    def spec(self) -> dict:
        spec = {"kind": "lowrank_sparse", "rank": self.rank}
        spec.update({"nnz_per_row": self.values.shape[1]} if self.per_row else {"nnz": self.nnz})
        if self.fmt != "indices":  # absent: the original index format (older checkpoints load unchanged)
            spec["format"] = self.fmt
        return spec
