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
