"""Rank allocation across all targets (recipe `allocation: energy | global`), from one dense calibration pass.

The method's `spectrum` gives, per target, singular values whose squared tail is the method's own error at each
rank (for svd-llm: the output error on the calibration inputs). `energy` keeps a fraction of each spectrum;
`global` spends the recipe's total parameter budget (param_ratio × all targeted parameters, or rank·(m+n)
summed for a fixed rank) where it removes the most error. Seconds after the statistics exist.
"""

from __future__ import annotations

import torch

from compressor.errors import UserError
from compressor.rank import allocate_energy, allocate_global, predicted_relative_error, resolve_rank


def _budget(shapes: dict, options) -> int:
    """What `uniform` would store for these targets: global allocation redistributes exactly that budget (never
    more), so the two are compared at equal size."""
    total = 0
    for m, n in shapes.values():
        rank, _ = resolve_rank(m, n, options)
        total += m * n if rank is None else rank * (m + n)
    return total


@torch.no_grad()
def allocate_ranks(recipe, method, options, layer_targets, statistics) -> dict[str, tuple[int | None, float | None]]:
    """name -> (rank or None for "keep dense", predicted relative output error)."""
    if not method.factorizes or method.spectrum is None:
        raise UserError(f"allocation '{recipe.allocation}' needs a low-rank method; '{method.name}' has no rank to allocate")
    spectra, shapes = {}, {}
    for targets, (groups, stats) in zip(layer_targets, statistics.layers):
        for owner, names in groups.items():
            for name in names:
                W = targets[name].weight.detach().to(torch.float32)[None]
                spectra[name] = method.spectrum(W, stats[owner], options)[0].cpu()
                shapes[name] = tuple(W.shape[1:])
            stats[owner].release_derived()
    opts = recipe.allocation_options
    if recipe.allocation == "energy":
        ranks = allocate_energy(spectra, shapes, opts.energy)
    else:
        ranks = allocate_global(spectra, shapes, _budget(shapes, options), weight=opts.weight, min_rank=opts.min_rank)
    return {
        name: (ranks[name], None if ranks[name] is None else predicted_relative_error(spectra[name], ranks[name]))
        for name in spectra
    }

