"""Compress the targets of one decoder layer with one method, swap the modules, and measure what changed.

Targets that share an input (and so a Stats object) and a shape are decomposed in one batched call. The rank
comes from rank.py for factorising methods; a target where factoring would not save parameters stays dense
and gets a report line saying so.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from compressor.modules import module_from_factors
from compressor.rank import resolve_rank
from compressor.registry import Method
from compressor.stats import Stats
from compressor.targets import set_submodule


@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, int]  # (out, in)
    compressed: bool
    spec: dict | None
    params_before: int
    params_after: int
    rel_weight_error: float
    rel_output_error: float | None  # ‖(W − Ŵ)X‖_F / ‖W X‖_F on the calibration inputs
    clamped_eigenvalues: int
    seconds: float
    note: str = ""
    predicted_rel_output_error: float | None = None  # from the dense model's spectrum (rank allocation)

    def to_dict(self) -> dict:
        return asdict(self)


ERROR_ROWS = 512  # rows per fp64 block: the transient stays ~3 × 512 × n × 8 bytes, whatever the matrix size


def _errors(W: torch.Tensor, W_hat: torch.Tensor, gram: torch.Tensor | None) -> tuple[float, float | None]:
    g = None if gram is None else gram.to(W.device, torch.float64)
    sums = torch.zeros(4, dtype=torch.float64)  # ‖Δ‖², ‖W‖², tr(Δ G Δᵀ), tr(W G Wᵀ)
    for start in range(0, W.shape[0], ERROR_ROWS):
        w = W[start : start + ERROR_ROWS].to(torch.float64)
        delta = w - W_hat[start : start + ERROR_ROWS].to(W.device, torch.float64)
        sums[0] += delta.pow(2).sum().cpu()
        sums[1] += w.pow(2).sum().cpu()
        if g is not None:
            sums[2] += ((delta @ g) * delta).sum().cpu()
            sums[3] += ((w @ g) * w).sum().cpu()
    rel_w = math.sqrt(sums[0].item() / max(sums[1].item(), 1e-300))
    if g is None:
        return rel_w, None
    return rel_w, math.sqrt(max(sums[2].item(), 0.0) / max(sums[3].item(), 1e-300))


@torch.no_grad()
def compress_layer(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    groups: dict[str, list[str]],
    stats: dict[str, Stats],
    method: Method,
    options,
    allocated: dict | None = None,
) -> list[ModuleReport]:
    """`groups`: owner -> names sharing its input; `stats`: owner -> Stats. Swaps modules in `model`.

    `allocated`: name -> (rank or None for "keep dense", predicted error) from rank allocation; without it a
    factorising method's rank comes from its own `rank` / `param_ratio` option."""
    reports: list[ModuleReport] = []
    for owner, names in groups.items():
        buckets: dict[tuple, list[str]] = {}
        for name in names:
            m, n = targets[name].weight.shape
            rank = None
            if method.factorizes:
                if allocated is not None:
                    rank = allocated[name][0]
                    reason = "" if rank is not None else "rank allocation kept it dense (no rank saves parameters)"
                else:
                    rank, reason = resolve_rank(m, n, options)
                if rank is None:
                    bias = targets[name].bias
                    dense = m * n + (0 if bias is None else bias.numel())
                    reports.append(ModuleReport(name, (m, n), False, None, dense, dense, 0.0, 0.0, 0, 0.0, reason))
                    continue
            buckets.setdefault((m, n, rank), []).append(name)
        for (m, n, rank), members in buckets.items():
            originals = [targets[name] for name in members]
            W = torch.stack([lin.weight.detach() for lin in originals]).to(torch.float32)
            start = time.perf_counter()
            result = method.decompose(W, stats[owner], options, rank)
            seconds = (time.perf_counter() - start) / len(members)
            clamps = result.clamped_eigenvalues // len(members)
            for name, lin, factors in zip(members, originals, result.factors):
                bias = lin.bias.detach() if lin.bias is not None else None
                module = module_from_factors(factors, bias, lin.weight.dtype).to(lin.weight.device)
                rel_w, rel_out = _errors(lin.weight.detach(), module.dense_weight(), stats[owner].gram)
                if not (math.isfinite(rel_w) and (rel_out is None or math.isfinite(rel_out))):
                    raise FloatingPointError(f"{method.name} produced non-finite weights for {name}")
                after = factors.num_params() + (0 if bias is None else bias.numel())
                before = m * n + (0 if bias is None else bias.numel())
                predicted = allocated[name][1] if allocated is not None else None
                reports.append(ModuleReport(name, (m, n), True, factors.spec(), before, after, rel_w, rel_out, clamps,
                                            seconds, predicted_rel_output_error=predicted))
                set_submodule(model, name, module)
                # The replaced linear stays referenced by the caller's target lists: free its weight now, or
                # every decoder layer's dense weights would live until compression ends.
                lin.to("meta")
        stats[owner].release_derived()
    return reports
