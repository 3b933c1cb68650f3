"""Packed low-bit matmuls on torch's own kernels, and the one-time conversion of lrc's stored layout to theirs.

lrc stores b-bit codes q ∈ [0, 2^b) packed in int32 words with one fp16 scale s and one integer zero point z per
group of input columns: w = (q − z)·s (compressor/quant.py). torch ships two packed kernels:

- int4 (gpt-fast's "tinygemm" layout): `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` (CUDA) compute
  x·Wᵀ with w = (q − 8)·s + z' per group, from `scales_and_zeros` (K/g, N, 2) = [s, z']. So z' = (8 − z)·s, exact
  in fp32 (a 4-bit integer times an fp16); narrower codes are shifted to the middle of the range (`pack`). The
  kernel's group g must be 32, 64, 128 or 256 and divide K: lrc's group G is re-expressed as groups of
  g | gcd(G, K) with repeated scales (same weights; G = 128 on K = 576 → g = 64), so ragged last groups need no padding. N must be a multiple of 16 on CPU (8 on CUDA).
- int8 per output channel: `_weight_int8pack_mm(x, w int8 (N, K), s (N,))` = x·(w·s)ᵀ. With one group per row,
  (q − z)·s = (q − h)·s + (h − z)·s with h = 2^(b−1) (128 at 8 bits), so
  y = int8mm(x, q − h, s) + (Σₖ x) ⊗ (h − z)·s.

Measured on torch 2.13's CPU build (x86 with avx512_bf16): both kernels are vectorised for bfloat16 activations
only — fp32 and fp16 inputs take a scalar loop 30–100× slower than a dense fp32 GEMM. On CPU the activations are
therefore cast to bf16 for the kernel and the output cast back (relative rounding 2⁻⁹ per activation, far inside a
4-bit weight's error; tests/test_kernels.py bounds it). The CUDA kernel takes bf16 as well.

Narrower codes ride the same kernels exactly (`kernel_kind`): 2- and 3-bit codes are 4-bit codes that leave the top
values unused, so they take the int4 kernel with the same scales and zero points; 5- to 7-bit codes with one group
per row take the int8 one (q − 2^(b−1) fits an int8). Everything else (5-, 6-, 7-bit or 8-bit with several groups per
row: the int8 kernel has one scale per output channel, so a grouped layout is not exact on it; shapes a kernel
refuses, a torch build without the op, CUDA int4 below sm80) has no kernel: the caller keeps its
dequantise-per-forward path and `fallback_reason` says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from compressor import quant

INT4_GROUPS = (256, 128, 64, 32)


@dataclass
class Packed:
    """One linear's weight in a kernel's layout, for one device. `weight`: int4 packed (CPU uint8 (N, K/2); CUDA
    int32 tiles) or int8 (N, K); `scales`: int4 scales_and_zeros (K/g, N, 2) or int8 (N,) scales, in the kernel's
    activation dtype (bf16: the kernels take no other); `offset`: int8 only, (N,) fp32 (2^(b−1) − z)·s."""

    kind: str
    weight: torch.Tensor
    scales: torch.Tensor
    group: int
    offset: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [self.weight, self.scales] + ([self.offset] if self.offset is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _int4_group(group_size: int, in_features: int) -> int | None:
    return next((g for g in INT4_GROUPS if group_size % g == 0 and in_features % g == 0), None)


# The aten ops each path calls (matmul, and the layout conversion `pack` calls). Private ops: older torch builds lack
# some (the CPU int4 pair arrived in about 2.6), so each is probed before use, never assumed.
OPS = {("int4", "cpu"): ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"),
       ("int4", "cuda"): ("_weight_int4pack_mm", "_convert_weight_to_int4pack"),
       ("int8", "cpu"): ("_weight_int8pack_mm",), ("int8", "cuda"): ("_weight_int8pack_mm",)}
CUDA_INT4_CAPABILITY = (8, 0)  # tinygemm's bf16 tensor-core tiles: Ampere (sm80) and newer


def has_kernel(op: str, device_type: str) -> bool:
    """Whether this torch build has aten.`op` with a kernel for `device_type` ("cpu"/"cuda"); an op the build does
    not know at all (the lookup raises) counts as absent."""
    try:
        getattr(torch.ops.aten, op)
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", device_type.upper()))
    except (AttributeError, RuntimeError):
        return False


def kernel_kind(bits: int, group_size: int, in_features: int) -> str | None:
    """The kernel whose layout holds these codes exactly: "int4" (1-4 bits), "int8" (5-8 bits, one group per row),
    or None."""
    if bits <= 4:
        return "int4"
    if bits <= 8 and quant.num_groups(in_features, group_size) == 1:
        return "int8"
    return None


def fallback_reason(bits: int, group_size: int, in_features: int, out_features: int, device) -> str | None:
    """Why torch has no packed kernel for this layout on `device` (None: it has one)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if device.type not in ("cpu", "cuda"):
        return f"no packed kernel on {device.type}"
    kind = kernel_kind(bits, group_size, in_features)
    if kind is None:
        return (f"torch has no {bits}-bit packed kernel for {group_size}-column groups (the int8 kernel takes one "
                f"scale per output channel; this layout has several groups per row)")
    for op in OPS[(kind, device.type)]:
        if not has_kernel(op, device.type):
            return f"this torch build ({torch.__version__}) has no {device.type.upper()} kernel for aten.{op}"
    if kind == "int4" and cuda:
        capability = tuple(torch.cuda.get_device_capability(device))
        if capability < CUDA_INT4_CAPABILITY:
            return (f"the CUDA int4 kernel needs compute capability {'.'.join(map(str, CUDA_INT4_CAPABILITY))}+, "
                    f"this GPU has {'.'.join(map(str, capability))}")
    if kind == "int4":
        if _int4_group(group_size, in_features) is None:
            return (f"int4 kernels need a group of 32/64/128/256 columns dividing in_features; group_size "
                    f"{group_size}, in_features {in_features}")
        if out_features % (8 if cuda else 16):
            return f"int4 kernel needs out_features divisible by {8 if cuda else 16}, got {out_features}"
        if cuda and in_features % 32:
            return f"CUDA int4 kernel needs in_features divisible by 32, got {in_features}"
        return None
    return None  # int8: kernel_kind has checked the one group per row


@torch.no_grad()
def pack(qweight, qzeros, scales, bits: int, group_size: int, in_features: int, device) -> Packed:
    """lrc's (qweight, qzeros, scales) → the kernel layout on `device`, once. Raises ValueError where
    `fallback_reason` is not None."""
    out_features = qweight.shape[0]
    reason = fallback_reason(bits, group_size, in_features, out_features, device)
    if reason:
        raise ValueError(reason)
    device = torch.device(device)
    groups = scales.shape[1]
    q = quant.unpack(qweight.to(device), bits, in_features)  # (N, K) int32
    z = quant.unpack(qzeros.to(device), bits, groups).float()  # (N, groups)
    s = scales.to(device).float()
    if kernel_kind(bits, group_size, in_features) == "int8":
        # Centred (as the int4 codes below): (q − z)·s = (q − h)·s + (h − z)·s with h = 2^(b−1), q − h ∈ [−128, 128) for 5-8 bits,
        # so the bf16 product and the offset term stay as small as the weights (no cancellation of large terms).
        half = 2 ** (bits - 1)
        weight = (q - half).to(torch.int8)
        return Packed("int8", weight, s[:, 0].to(torch.bfloat16), in_features, ((half - z) * s)[:, 0].contiguous())
    g = _int4_group(group_size, in_features)
    rep = group_size // g
    k_groups = in_features // g
    # Narrower codes are shifted to the middle of the int4 range: w = (q + c − 8)·s + (8 − c − z)·s, the same value,
    # with a zero term |8 − c − z| ≤ 2^(b−1) as small as a native b-bit one (unshifted, a 2-bit code's two terms
    # of ~8·s cancel to ~s, and their bf16 roundings grow 4× relative to it).
    shift = 8 - 2 ** (bits - 1)
    q = q + shift
    s4 = s.repeat_interleave(rep, dim=1)[:, :k_groups]
    z4 = ((8 - shift - z) * s).repeat_interleave(rep, dim=1)[:, :k_groups]
    scales_and_zeros = torch.stack([s4, z4], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    if device.type == "cuda":
        tiles = next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        weight = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles)
    else:
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    return Packed("int4", weight, scales_and_zeros, g)


def matmul(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """x (..., K) · Wᵀ → (..., N) in x's dtype, on the packed kernel (activations in bf16)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xb = x2.to(torch.bfloat16)
    if packed.kind == "int8":
        y = torch.ops.aten._weight_int8pack_mm(xb, packed.weight, packed.scales).to(x.dtype)
        y = y + x2.float().sum(-1, keepdim=True).mul(packed.offset).to(x.dtype)  # the zero points' share
    elif xb.is_cuda:
        y = torch.ops.aten._weight_int4pack_mm(xb, packed.weight, packed.group, packed.scales).to(x.dtype)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed.weight, packed.group, packed.scales).to(x.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])


def dequantized_chunks(qweight, qzeros, scales, bits: int, group_size: int, in_features: int, rows: int):
    """Yield (row slice, dequantised fp32 rows) of at most `rows` output rows: the fallback's bounded-memory walk."""
    groups = scales.shape[1]
    for r0 in range(0, qweight.shape[0], rows):
        sl = slice(r0, r0 + rows)
        q = quant.unpack(qweight[sl], bits, in_features)
        z = quant.unpack(qzeros[sl], bits, groups)
        yield sl, quant.dequantize(q, scales[sl], z, group_size)


def fallback_rows(in_features: int, out_features: int, bits: int, element_size: int) -> int:
    """Output rows per dequantised chunk, so that a chunk's temporaries (about 24 bytes per weight: int64 unpack,
    int32 codes, fp32 weights and the repeated scales/zeros; 8 bytes per bit more for the bit-stream unpack of
    widths that do not divide 32) stay under half the dense layer's bytes (`element_size` per weight)."""
    temp = 24 if 32 % bits == 0 else 8 * bits + 16
    return max(16, min(out_features, out_features * element_size // (2 * temp)))


# LowRankSparseLinear's sparse part S (out × in, `density` of its entries kept). Measured with torch 2.13 on the
# 2-core CPU, 1 thread, SmolLM2's shapes (576×576, 1536×576, 576×1536), fp32: a CSR product (torch.sparse.mm) is
# 3–4× slower than the dense GEMM of the same shape at 32% density (the lowrank-sparse-50 recipe's), for every
# batch from 1 to 2048 tokens; at 10% it is 0.7–1.3× the dense time. Below SPARSE_CSR_MAX_DENSITY the module
# multiplies by S in CSR next to its two low-rank GEMMs; above it the fastest exact product torch offers is one dense
# GEMM by W = B·A + S, formed once (the dense layer's speed and memory, next to the small stored factors).
SPARSE_CSR_MAX_DENSITY = 0.05


def sparse_path(nnz: int, out_features: int, in_features: int, device) -> str:
    """"csr" or "merged" (see SPARSE_CSR_MAX_DENSITY); CUDA's CSR kernels pay at any density this format stores."""
    if torch.device(device).type == "cuda":
        return "csr"
    return "csr" if nnz <= SPARSE_CSR_MAX_DENSITY * out_features * in_features else "merged"


def csr(dense: torch.Tensor) -> torch.Tensor:
    """A dense (out, in) matrix as CSR with int32 indices (torch's CSR kernels are faster with int32)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "CSR support is in beta", invariant checks
        c = dense.to_sparse_csr()
        return torch.sparse_csr_tensor(c.crow_indices().int(), c.col_indices().int(), c.values(), c.shape)


def csr_linear(x: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """x (..., in) · Sᵀ for S in CSR (out, in)."""
    x2 = x.reshape(-1, x.shape[-1])
    return torch.sparse.mm(S, x2.T).T.reshape(*x.shape[:-1], S.shape[0])


# Low-rank factors at inference (compressor.nn.modules' prepare() methods and fuse_siblings).


def contiguous_factors(module, state_dict, prefix, local_metadata):
    """state_dict hook: factors kept transposed in memory (prepare()) are written row-major, as stored."""
    for name in ("A.weight", "B.weight", "lora_A.weight", "lora_B.weight"):
        key = prefix + name
        if key in state_dict and not state_dict[key].is_contiguous():
            state_dict[key] = state_dict[key].contiguous()


def row_major(*linears: torch.nn.Linear) -> None:
    """Undo transpose_in_memory: each weight row-major again, as stored. The exact reference path multiplies in
    this layout, so its products round exactly as a plain nn.Linear's (a serving export's adapter, PEFT)."""
    with torch.no_grad():
        for linear in linears:
            if not linear.weight.is_contiguous():
                linear.weight.data = linear.weight.data.contiguous()


def transpose_in_memory(*linears: torch.nn.Linear) -> None:
    """Keep each weight with its transpose contiguous: same values, other strides (see LowRankLinear.prepare)."""
    with torch.no_grad():
        for linear in linears:
            w = linear.weight
            if w.is_contiguous() and min(w.shape) > 1:
                w.data = w.data.T.contiguous().T


class SharedInputA:
    """The A factors of sibling LowRankLinears that read the same input (q/k/v, gate/up) as one GEMM: concatenated
    once (again if a factor, its device or dtype changes); the first sibling called computes every sibling's A x
    and each other sibling takes its slice when handed the very same tensor (anything else: its own A). Not a module:
    nothing is registered, saved or trained."""

    def __init__(self, members: list):  # LowRankLinear modules
        self.members = members
        self._weight, self._key = None, None
        self._x, self._parts, self._left = None, None, set()

    def nbytes(self) -> int:
        return self._weight.numel() * self._weight.element_size() if self._weight is not None else 0

    def release(self) -> None:
        """Drop the concatenated A and any projections waiting for a sibling (a member moved or was cast)."""
        self._weight, self._key = None, None
        self._x, self._parts, self._left = None, None, set()

    def _concatenated(self, x) -> torch.Tensor:
        key = (x.dtype, *((m.A.weight._version, m.A.weight.data_ptr()) for m in self.members))
        if key != self._key:  # (Σ rank, in) with its transpose contiguous, as LowRankLinear.prepare keeps A
            self._weight = torch.cat([m.A.weight.detach().to(x.dtype).T for m in self.members], dim=1).T
            self._key = key
        return self._weight

    def project(self, member, x) -> torch.Tensor | None:
        index = self.members.index(member)
        if x is self._x and index in self._left:
            self._left.discard(index)
            part = self._parts[index]
            if not self._left:
                self._x, self._parts = None, None  # every sibling served: release the input and the projections
            return part
        weight = self._concatenated(x)
        if weight.device != x.device:
            return None
        self._parts = torch.nn.functional.linear(x, weight).split([m.rank for m in self.members], dim=-1)
        self._x, self._left = x, set(range(len(self.members))) - {index}
        return self._parts[index]
