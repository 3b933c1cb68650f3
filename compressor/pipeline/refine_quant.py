"""Block refinement of quantised encodings (AutoRound-style): the codes and per-group scales / zero points of a
decoder layer's quantised modules trained on their own grid, jointly with the layer's other refinable parameters
(compressor/pipeline/refine.py owns the loop, the loss and the keep-or-revert rule).

Each packed matrix (a QuantLinear's weight, a QuantLowRankLinear's two factors) is seen during training through a
differentiable view of what it stores, per group with scale s, zero point z and codes q in [0, 2^b − 1]:

    s' = s·(1 + γ),   z' = clamp(round(z + ζ), 0, 2^b − 1),   q' = clamp(round((q − z)·s/s' + V) + z', 0, 2^b − 1)
    w  = (q' − z')·s'

with V a rounding offset per weight in [−1, 1], γ ∈ [−0.5, 0.5] a scale adjustment and ζ ∈ [−1, 1] a zero-point
adjustment per group, all zero at the start (so the view starts as exactly the stored weight), round passed
straight through in the backward (STE). s' rescales the group's dequantised values (AutoRound's learnt clipping
range, on fixed codes), a moved z' shifts the group's clamp window, V moves single codes by at most one step.

AutoRound starts from the dense weight W with V ∈ [−0.5, 0.5] on W/s, reaching the two codes around W/s; the
pipeline no longer holds W when a layer is refined, and GPTQ's codes are not the rounding of W anyway, so the view
starts from what the layer holds (the codes, GPTQ's or RTN's, and their scales) and V's range is one step either
way. The optimiser differs for that reason. AutoRound's SignSGD works because each V starts at its weight's
rounding residual: the weights near a rounding boundary flip first. Started from the codes themselves every V is
half a step from a flip, SignSGD flips every code whose gradient keeps its sign — on the demo model (3-bit,
group 128) that never lowered a layer's error. So V moves by its gradient over the gradient's RMS (per matrix):
the codes with the largest, most consistent gradients cross first (RTN 3-bit, demo layer 2: output error −54 %,
against −26 % for the scales alone). Scales and zero points move by SignSGD (AutoRound's optimiser), scales by a
small relative step. Every step decays linearly to zero. At the end the view is written back as integer codes in
[0, 2^b − 1], zero points and fp16 scales — the checkpoint format, packed exactly as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from compressor import quant
from compressor.nn.quant_linear import QuantLinear, QuantLowRankLinear

BOUNDS = {"offset": 1.0, "scale": 0.5, "zero": 1.0}  # |V|, |γ|, |ζ| at most


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _columns(t: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, dim=1)[:, :n]


@dataclass
class _Matrix:
    """One packed matrix of a quantised module and its learnable adjustments."""

    module: nn.Module
    prefix: str
    cols: int
    bits: int
    group_size: int

    def __post_init__(self):
        scales = getattr(self.module, f"{self.prefix}scales")
        self.q0 = quant.unpack(getattr(self.module, f"{self.prefix}qweight"), self.bits, self.cols)
        self.z0 = quant.unpack(getattr(self.module, f"{self.prefix}qzeros"), self.bits, scales.shape[1])
        self.s0 = scales.clone()
        device = scales.device
        self.offset = nn.Parameter(torch.zeros(self.q0.shape, device=device))
        self.scale = nn.Parameter(torch.zeros(scales.shape, device=device))
        self.zero = nn.Parameter(torch.zeros(scales.shape, device=device))

    def parameters(self) -> list[nn.Parameter]:
        return [self.offset, self.scale, self.zero]

    def _codes(self, rnd, move: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = 2**self.bits - 1
        n, g = self.cols, self.group_size
        z0 = self.z0.float()
        zero = torch.clamp(rnd(z0 + self.zero), 0, qmax)
        u = self.q0.float() - _columns(z0, g, n) + (self.offset if move else 0)
        return torch.clamp(rnd(u) + _columns(zero, g, n), 0, qmax), zero

    def weight(self) -> torch.Tensor:
        """The differentiable view (fp32)."""
        s = self.s0.float() * (1 + self.scale)
        q, zero = self._codes(_ste_round)
        return (q - _columns(zero, self.group_size, self.cols)) * _columns(s, self.group_size, self.cols)

    @torch.no_grad()
    def write(self, move: bool = True) -> int:
        """Store the view as codes, zero points and fp16 scales (`move` False: without the rounding offsets); the
        number of codes that changed."""
        s = (self.s0.float() * (1 + self.scale)).half()
        s = torch.where(torch.isfinite(s) & (s > 0), s, self.s0)  # (an fp16 underflow or overflow keeps its scale)
        q, zero = self._codes(torch.round, move)
        q, zero = q.to(torch.int32), zero.to(torch.int32)
        self.module.write_codes(q, zero, s, prefix=self.prefix)
        return int((q != self.q0).sum())

    @torch.no_grad()
    def restore(self) -> None:
        self.module.write_codes(self.q0, self.z0, self.s0, prefix=self.prefix)

    @torch.no_grad()
    def clamp_(self) -> None:
        for p, bound in zip(self.parameters(), BOUNDS.values()):
            p.clamp_(-bound, bound)


class _View(nn.Module):
    """A quantised module's stand-in while its layer trains: the same forward on the differentiable weights."""

    def __init__(self, module: nn.Module, matrices: list[_Matrix]):
        super().__init__()
        self.module, self.matrices = module, matrices

    def forward(self, x):
        m = self.module
        if isinstance(m, QuantLowRankLinear):
            A, B = (matrix.weight().to(x.dtype) for matrix in self.matrices)
            return nn.functional.linear(nn.functional.linear(x, A), B, m.bias)
        y = nn.functional.linear(x, self.matrices[0].weight().to(x.dtype),
                                 m.bias.to(x.dtype) if m.bias is not None else None)
        return y + m.lora_B(m.lora_A(x)) if m.rank else y


def _matrices(module: nn.Module) -> list[_Matrix]:
    if isinstance(module, QuantLinear):
        return [_Matrix(module, "", module.in_features, module.bits, module.group_size)]
    if isinstance(module, QuantLowRankLinear):
        return [_Matrix(module, "A_", module.in_features, module.bits, module._gA),
                _Matrix(module, "B_", module.rank, module.bits, module._gB)]
    return []


class QuantRefinement:
    """The quantised modules among a layer's refined `modules`: `swapped()` trains them through their views,
    `step()` is one SignSGD step, `write()` stores the result in the modules' own format, `restore()` the start."""

    def __init__(self, layer: nn.Module, modules: list[nn.Module]):
        self.layer = layer
        names = {id(m): name for name, m in layer.named_modules()}
        self.modules = [(names[id(m)], m, _matrices(m)) for m in modules if _matrices(m) and id(m) in names]

    def __bool__(self) -> bool:
        return bool(self.modules)

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, _, matrices in self.modules for matrix in matrices for p in matrix.parameters()]

    def count(self) -> int:
        """Learnt adjustments: one offset per stored weight, a scale and a zero point per group."""
        return sum(p.numel() for p in self.parameters())

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.layer.get_submodule(parent) if parent else self.layer, child, module)

    @contextlib.contextmanager
    def swapped(self):
        for name, module, matrices in self.modules:
            self._set(name, _View(module, matrices))
        try:
            yield
        finally:
            for name, module, _ in self.modules:
                self._set(name, module)

    @torch.no_grad()
    def step(self, lr: float, scale_lr: float) -> None:
        """One step: the rounding offsets by `lr` × their gradient over its RMS (per matrix), the zero points by
        `lr` × its sign (both in codes), the scales by `scale_lr` × its sign (relative)."""
        for _, _, matrices in self.modules:
            for matrix in matrices:
                offset, scale, zero = matrix.parameters()
                if offset.grad is not None:
                    offset.sub_(lr * offset.grad / offset.grad.pow(2).mean().sqrt().clamp_min(1e-30))
                for p, size in ((scale, scale_lr), (zero, lr)):
                    if p.grad is not None:
                        p.sub_(size * torch.sign(p.grad))
                matrix.clamp_()

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def write(self, move: bool = True) -> int:
        return sum(matrix.write(move) for _, _, matrices in self.modules for matrix in matrices)

    def restore(self) -> int:
        for _, _, matrices in self.modules:
            for matrix in matrices:
                matrix.restore()
        return 0  # codes changed
