"""Compress the targets of one decoder layer with one method, swap the modules, and measure what changed.

Targets that share an input (and so a Stats object) and a shape are decomposed in one batched call (split where its
fp64 weights would pass BATCH_BYTES). The rank comes from rank.py for factorising methods; a target where
factoring would not save parameters stays dense and gets a report line saying so.

Bytes: every report line also carries the target's stored bytes before (dense, in the checkpoint's dtype) and
after (the replacement module's tensors as they will be written: compressor.nn.modules.stored_bytes), so
`size_ratio` is measured, not predicted. Options with a `dense_bits` field (byte budgets) get it filled in from
the checkpoint's dtype; a factorising method whose options set `factor_bits` has its factors quantised
(compressor/methods/factor_quant.py) before the modules are built.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from compressor.methods.factor_quant import quantize_decomposition
from compressor.nn.modules import module_from_factors, stored_bytes
from compressor.budget.rank import resolve_rank
from compressor.registry import Method
from compressor.pipeline.stats import Stats
from compressor.pipeline.targets import set_submodule


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
    bytes_before: int | None = None  # the dense weight (+ bias) in the checkpoint's dtype
    bytes_after: int | None = None  # every tensor the checkpoint holds for this target

    def to_dict(self) -> dict:
        out = asdict(self)
        out["param_ratio"] = self.params_after / max(self.params_before, 1)
        out["size_ratio"] = None if self.bytes_before is None else self.bytes_after / max(self.bytes_before, 1)
        return out


def with_dense_bits(options, dtype: torch.dtype):
    """`options` with `dense_bits` (bits of one weight of the output dtype) filled in, when the method's options
    have that field and the recipe left it unset."""
    if "dense_bits" not in type(options).model_fields or getattr(options, "dense_bits") is not None:
        return options
    return options.model_copy(update={"dense_bits": 8 * torch.empty((), dtype=dtype).element_size()})


ERROR_ROWS = 512  # rows per fp64 block: the transient stays ~3 × 512 × n × 8 bytes, whatever the matrix size


def _errors(W: torch.Tensor, W_hat: torch.Tensor, gram: torch.Tensor | None) -> tuple[float, float | None]:
    """Relative weight and output errors. The Gram's products run in its own dtype (a report-only fp32 Gram is
    never copied to fp64: 6.6 GB at a 70B down_proj), each block's sums accumulated in fp64."""
    g = None if gram is None else gram.to(W.device)
    sums = torch.zeros(4, dtype=torch.float64)  # ‖Δ‖², ‖W‖², tr(Δ G Δᵀ), tr(W G Wᵀ)
    for start in range(0, W.shape[0], ERROR_ROWS):
        w = W[start : start + ERROR_ROWS].to(torch.float64)
        delta = w - W_hat[start : start + ERROR_ROWS].to(W.device, torch.float64)
        sums[0] += delta.pow(2).sum().cpu()
        sums[1] += w.pow(2).sum().cpu()
        if g is not None:
            d, v = delta.to(g.dtype), w.to(g.dtype)
            sums[2] += ((d @ g) * d).sum(dtype=torch.float64).cpu()
            sums[3] += ((v @ g) * v).sum(dtype=torch.float64).cpu()
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
    storage_dtype: torch.dtype | None = None,
) -> list[ModuleReport]:
    """`groups`: owner -> names sharing its input; `stats`: owner -> Stats. Swaps modules in `model`.
    `storage_dtype`: the checkpoint's dtype (bytes are counted in it; default: the weights' own dtype).

    `allocated`: name -> (rank or None for "keep dense", predicted error) from rank allocation; without it a
    factorising method's rank comes from its own `rank` / `param_ratio` option."""
    reports: list[ModuleReport] = []
    first = next(iter(targets.values()), None)
    storage_dtype = storage_dtype or (first.weight.dtype if first is not None else torch.float32)
    element_size = torch.empty((), dtype=storage_dtype).element_size()
    options = with_dense_bits(options, storage_dtype)
    factor_bits = getattr(options, "factor_bits", None) if method.factorizes else None
    # The widest input first, its statistics dropped once its readers are done: down_proj's n² Gram is gone
    # before gate/up's solves allocate theirs (one layer's peak is the largest Gram, not all of them at once).
    for owner, names in sorted(groups.items(), key=lambda item: -_input_width(targets, item[1])):
        buckets: dict[tuple, list[str]] = {}
        for name in names:
            m, n = targets[name].weight.shape
            rank = None
            if method.choices is not None and allocated is not None:  # the encoding a byte budget chose
                rank = allocated[name][0]
                if rank is None:
                    _keep_dense(reports, name, targets[name], "the byte allocation kept it dense", element_size)
                    continue
            elif method.factorizes:
                if allocated is not None:
                    rank = allocated[name][0]
                    reason = "" if rank is not None else "rank allocation kept it dense (no rank saves parameters)"
                else:
                    rank, reason = resolve_rank(m, n, options)
                if rank is None:
                    _keep_dense(reports, name, targets[name], reason, element_size)
                    continue
            buckets.setdefault((m, n, rank), []).append(name)
        for (m, n, rank), members in _batches(buckets):
            originals = [targets[name] for name in members]
            W = torch.stack([lin.weight.detach() for lin in originals]).to(torch.float32)
            start = time.perf_counter()
            result = method.decompose(W, stats[owner], options, rank)
            if factor_bits is not None:
                result = quantize_decomposition(result, stats[owner].gram, factor_bits, options.factor_group_size)
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
                                            seconds, predicted_rel_output_error=predicted,
                                            bytes_before=before * element_size,
                                            bytes_after=stored_bytes(module, storage_dtype)))
                set_submodule(model, name, module)
                # The replaced linear stays referenced by the caller's target lists: free its weight now, or
                # every decoder layer's dense weights would live until compression ends.
                lin.to("meta")
        stats[owner].release()
    order = {name: i for i, name in enumerate(targets)}
    return sorted(reports, key=lambda report: order[report.name])


BATCH_BYTES = 1 << 30  # fp64 bytes of the weights one batched call may stack


def _batches(buckets: dict[tuple, list[str]]):
    """Each bucket in batches whose fp64 weights stay under BATCH_BYTES. Batching pays for small matrices (one
    kernel launch, one LAPACK call per batch); a 70B gate/up pair (2 × 28672 × 8192) stacked in fp64 is 3.8 GB,
    and every solve's temporaries double with it, while one at a time costs the same flops (the input's
    whitening is computed once either way: Stats.derived)."""
    for (m, n, rank), members in buckets.items():
        per_call = max(1, BATCH_BYTES // (m * n * 8))
        for start in range(0, len(members), per_call):
            yield (m, n, rank), members[start : start + per_call]


def _input_width(targets: dict[str, nn.Linear], names: list[str]) -> int:
    return max(targets[name].weight.shape[1] for name in names)


def _keep_dense(reports: list, name: str, linear: nn.Linear, reason: str, element_size: int) -> None:
    m, n = linear.weight.shape
    dense = m * n + (0 if linear.bias is None else linear.bias.numel())
    nbytes = dense * element_size
    reports.append(ModuleReport(name, (m, n), False, None, dense, dense, 0.0, 0.0, 0, 0.0, reason,
                                bytes_before=nbytes, bytes_after=nbytes))
