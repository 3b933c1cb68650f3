"""The planning pass of rank allocation (`allocation: energy | global`): one dense calibration walk over the
decoder layers that keeps only what allocation needs — each target's spectrum (a vector of min(m, n) numbers) —
and frees every layer's statistics as it goes. For a 7B model that is a few MB instead of the ~44 GB of fp64
Grams that keeping every layer's statistics would hold, and with `layer_io` (--low-memory) it reads each decoder
layer from disk and sends it back, so allocation works with one layer in memory.

Even when the recipe's decompositions use exactly the dense model's statistics
(compressor.pipeline.compression.dense_statistics_suffice), the layer pass computes each layer's statistics again
rather than keeping them from here: one more calibration pass for a bound of one layer's statistics in memory.
"""

from __future__ import annotations

from compressor.budget.allocation import Spectra
from compressor.pipeline.fisher import per_module_fisher
from compressor.pipeline.sequential import run_sequential


def plan_ranks(model, batches, recipe, method, options, layer_targets, needs, *, fisher=None, loss_fisher=None,
               device="cpu", batch_size=8, layer_io=None) -> dict[str, tuple[int | None, float | None]]:
    """name -> (rank or None, predicted relative error): allocate_ranks from spectra gathered layer by layer.

    `fisher`: the Fisher pass's result when the method's statistics include it; `loss_fisher`: the one
    `weight: loss` reads (the same object when both are needed)."""
    plan = Spectra(recipe, method, options, layer_targets, loss_fisher)

    def on_layer(index, collector):
        groups, stats = collector.groups(), collector.stats
        if fisher is not None:
            groups, stats = per_module_fisher(groups, stats, fisher)
        plan.add_layer(index, groups, stats)

    run_sequential(model, batches, layer_targets, needs, on_layer, device=device, batch_size=batch_size,
                   propagate="dense", layer_io=layer_io, read_only=True,
                   skip_first=recipe.calibration.skip_first)
    return plan.allocate()
