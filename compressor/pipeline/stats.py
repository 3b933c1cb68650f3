"""Per-linear calibration statistics, accumulated by forward hooks in fp64.

Linears that read the same input tensor (q/k/v; gate/up) are detected at run time by the identity of the
tensor they receive, so they share one accumulator: no per-architecture table. Statistics live in this
collector, keyed by module name, never on the modules; `remove()` takes every hook away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.linalg import DEFAULT_EIG_FLOOR, Whitening, whitening

# Token rows per Gram product: each chunk's XᵀX is formed in fp32 (half the cost of fp64 on CPUs, tensor cores on
# GPUs; an fp32 sum of ≤ 4096 products has relative error ~1e-6 of the diagonal), then added to the fp64 total,
# so rounding does not grow with the number of calibration tokens.
GRAM_CHUNK = 4096
GRAM_COLUMNS = 1024


@dataclass
class Stats:
    """Statistics of one linear's inputs x_t (n features) over `count` calibration tokens."""

    count: int = 0
    gram: torch.Tensor | None = None  # Σ x xᵀ, (n, n) fp64 (fp32 when only the report reads it: "report_gram")
    abs_sum: torch.Tensor | None = None  # Σ |x|, (n,) fp64
    # Diagonal Fisher Σ_batches (∂L/∂W_ij)² of ONE module (not shared with the input's other readers: each weight
    # has its own gradient), summed over the input axis -> one importance per output row (m,), and over the
    # output axis -> one per input column (n,). fp64. Set by compressor/pipeline/fisher.py, see fisher.per_module_fisher.
    fisher: torch.Tensor | None = None
    fisher_in: torch.Tensor | None = None
    # Σ x x̂ᵀ, (n, n) fp64: x the DENSE model's input of this linear, x̂ the input it gets in the model being
    # compressed (the same token). When both streams are the same (dense propagation) it is the Gram itself.
    cross: torch.Tensor | None = None

    _derived: dict = field(default_factory=dict, repr=False, compare=False)  # whitenings, GPTQ Hessians

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def whitening(self, eig_floor: float = DEFAULT_EIG_FLOOR, method: str = "eigh", ridge: float = 0.0) -> Whitening:
        """Whitening of the Gram, computed once per shared input (q/k/v, gate/up ask for the same). `ridge` = δ
        whitens G + λI with λ = δ·tr(G)/n instead (the clamp or damping then acts on that)."""
        def compute():
            gram = self.gram
            lam = float(ridge * gram.diagonal().sum() / gram.shape[-1]) if ridge else 0.0
            return whitening(gram, eig_floor, method, ridge=lam)

        return self.derived(("whitening", eig_floor, method, ridge), compute)

    def derived(self, key, compute):
        """`compute()` once per `key` for this input (a method's solve on the Gram alone, e.g. GPTQ's Hessian
        factor: shared by q/k/v and by every candidate of `auto`), kept until release_derived."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def release(self) -> None:
        """Drop everything (the input's readers are decomposed): an 8960-wide Gram is 0.64 GB fp64."""
        self.gram = self.cross = self.abs_sum = self.fisher = self.fisher_in = None
        self._derived.clear()

    def release_derived(self) -> None:
        """Drop cached whitenings and other solves (n×n each) once the input's readers are decomposed."""
        self._derived.clear()


def _add_gram_blocked(total: torch.Tensor, x: torch.Tensor) -> None:
    """total += xᵀ x, column block by column block, computing only the blocks on and above the diagonal (the
    product is symmetric: ~half the flops, and the Gram is most of a calibration pass at 8960+ features), then
    mirroring them below it; temporaries stay n × GRAM_COLUMNS as in _add_blocked."""
    n = x.shape[-1]
    for j in range(0, n, GRAM_COLUMNS):
        stop = min(j + GRAM_COLUMNS, n)
        total[:stop, j:stop].add_(x[:, :stop].T @ x[:, j:stop])
    for j in range(0, n, GRAM_COLUMNS):
        stop = min(j + GRAM_COLUMNS, n)
        total[stop:, j:stop].copy_(total[j:stop, stop:].T)


def _add_blocked(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """total += leftᵀ right, GRAM_COLUMNS columns at a time: the fp32 product and its fp64 copy stay
    n × GRAM_COLUMNS (117 MB at n = 28672) instead of n × n (3.3 GB for a 70B down_proj)."""
    for j in range(0, right.shape[-1], GRAM_COLUMNS):
        total[:, j : j + GRAM_COLUMNS].add_(left.T @ right[:, j : j + GRAM_COLUMNS])


@dataclass
class StatsCollector:
    modules: dict[str, nn.Module]
    needs: frozenset
    stats: dict[str, Stats] = field(default_factory=dict)  # keyed by the owner of each shared input
    owner: dict[str, str] = field(default_factory=dict)  # module name -> name whose accumulator it shares
    _handles: list = field(default_factory=list)
    _seen: dict = field(default_factory=dict)
    _reference: dict | None = None  # module name -> the dense model's input for this batch ("cross")
    paused: bool = False  # hooks see nothing while True (the runner's dense-stream forward)
    # Positions 0..skip_first-1 of every window (attention sinks) are left out of every statistic. Inputs are
    # (windows, positions, features); the count is of the tokens kept.
    skip_first: int = 0

    def __post_init__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def start_batch(self, reference: dict[str, torch.Tensor] | None = None):
        """`reference`: each target's input in the dense model for the same tokens (needed for "cross" when the
        inputs come from already-compressed layers; None when they are the dense model's own)."""
        self._seen.clear()
        self._reference = reference

    def _hook(self, name):
        def hook(module, args, output):
            if self.paused:
                return
            x = args[0]
            signature = (x.data_ptr(), tuple(x.shape), x.dtype)
            # Keep the tensor referenced until the next batch so its memory cannot be reused by a later,
            # different input of the same shape (which would otherwise look like a shared input).
            first, _ = self._seen.setdefault(signature, (name, x))
            self.owner.setdefault(name, first)
            if first != name:
                return  # same input as an earlier linear of this forward: its accumulator already has it
            self._accumulate(name, self._kept(x.detach()).reshape(-1, x.shape[-1]))

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, x: torch.Tensor):
        s = self.stats.setdefault(name, Stats())
        s.count += x.shape[0]
        n = x.shape[-1]
        gram_dtype = torch.float64 if "gram" in self.needs else torch.float32 if "report_gram" in self.needs else None
        if gram_dtype is not None:
            if s.gram is None:
                s.gram = torch.zeros(n, n, dtype=gram_dtype, device=x.device)
            for chunk in x.split(GRAM_CHUNK):
                _add_gram_blocked(s.gram, chunk.float())
        if "cross" in self.needs:
            self._accumulate_cross(s, name, x)
        if "abs_mean" in self.needs:
            a = x.to(torch.float64).abs().sum(0)
            s.abs_sum = a if s.abs_sum is None else s.abs_sum.add_(a)

    def _accumulate_cross(self, s: Stats, name: str, x: torch.Tensor):
        if self._reference is None:
            if s.gram is None:
                raise ValueError('"cross" statistics are accumulated next to the Gram: request "gram" too')
            s.cross = s.gram  # the inputs are the dense model's: Σ x x̂ᵀ is the Gram (same tensor, no copy)
            return
        ref = self._kept(self._reference[name]).reshape(-1, x.shape[-1])
        if s.cross is None:
            s.cross = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        for r, c in zip(ref.split(GRAM_CHUNK), x.split(GRAM_CHUNK)):
            _add_blocked(s.cross, r.float(), c.float())

    def _kept(self, x: torch.Tensor) -> torch.Tensor:
        if not self.skip_first:
            return x
        if x.dim() < 3:
            raise ValueError(f"skip_first needs inputs shaped (windows, positions, features), got {tuple(x.shape)}")
        return x[:, self.skip_first :]

    def restricted(self, names) -> "StatsCollector":
        """A view (no hooks) of the statistics of `names` only: one group of a group-sequential layer."""
        view = StatsCollector({}, self.needs, skip_first=self.skip_first)
        view.modules = {n: self.modules[n] for n in names}
        view.owner = {n: self.owner[n] for n in names if n in self.owner}
        view.stats = {o: self.stats[o] for o in dict.fromkeys(view.owner.values())}
        return view

    def for_module(self, name: str) -> Stats:
        return self.stats[self.owner[name]]

    def groups(self) -> dict[str, list[str]]:
        """owner -> the module names that share its input (in registration order)."""
        out: dict[str, list[str]] = {}
        for name in self.modules:
            out.setdefault(self.owner[name], []).append(name)
        return out

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
