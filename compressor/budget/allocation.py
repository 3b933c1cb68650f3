"""Rank allocation across all targets (recipe `allocation: energy | global`), from one dense calibration pass.

The method's `spectrum` gives, per target, singular values whose squared tail is the method's own error at each
rank (for svd-llm: the output error on the calibration inputs). `energy` keeps a fraction of each spectrum;
`global` spends the recipe's total parameter budget (param_ratio × all targeted parameters, or rank·(m+n)
summed for a fixed rank) where it removes the most error. Seconds after the statistics exist.

What `global` compares across modules (`allocation_options.weight`), and which spectra allow it (the method's
`spectrum_units`, compressor/registry.py). Unset, the weight is `loss` for output errors (svd-llm, a byte budget)
and `relative` otherwise (recipe.Allocation.default_weight):
- `raw`: the errors as they are. Refused for "scaled" spectra (ASVD, FWSVD normalise their scaling per module, so
  their scale is arbitrary per module); allowed with a warning for "output" (‖ΔW X‖²) units: the activations
  grow with depth (the residual stream), so equal raw errors at different depths are not equal damage
  (SmolLM2, svd-llm-40: perplexity 1331 against 151.8 uniform).
- `relative`: each error relative to the module's total Σσ² (‖W X‖² for svd-llm); scale-free, any method.
- `loss`: each output error in units of LM loss (Gauss-Newton / Fisher): with h_i = Σ_t (∂L/∂y_ti)² from the
  Fisher pass (compressor/pipeline/fisher.py), the loss increase of an output error E = ΔW X is ≈ ½ Σ_t Σ_i h_ti E_ti²
  ≈ ½ Σ_i h̄_i ‖E_i‖² (h̄ the per-token mean: the gradient and the error assumed uncorrelated over tokens), i.e.
  ‖diag(√h̄) ΔW X‖². For an "output" spectrum the rows of W are the output channels, so the method's spectrum
  of diag(√h̄)·W measures exactly that; it steers the allocation only (the decomposition and the predicted
  errors stay the method's own). Strictly it is the error of the best rank-r fit under the weighted norm, a
  lower bound on the weighted error of the method's own (unweighted) truncation; equal when h̄ is flat.
  Needs "output" units (svd-llm).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from compressor.budget.byte_budget import allocate_bytes
from compressor.errors import UserError
from compressor.budget.rank import allocate_energy, allocate_global, predicted_relative_error, resolve_rank, round_rank
from compressor.registry import SPECTRUM_UNITS


def validate_allocation(recipe, method, *, warn: bool = True) -> None:
    """Refuse, before any calibration work, an allocation that `method`'s spectrum cannot support; with `warn`,
    say in one line on stderr why an explicit `weight: raw` over output errors is risky (the user asked for it)."""
    if recipe.allocation == "uniform":
        return
    if method.choices is not None:  # a byte budget over encodings (compressor/budget/byte_budget.py): output-error units
        if recipe.allocation != "global":
            raise UserError(f"'{method.name}' spends a byte budget across targets with allocation 'global'; "
                            f"'{recipe.allocation}' is for low-rank methods")
        if warn and allocation_weight(recipe, method) == "raw":
            print(f"warning: {RAW_OUTPUT_RISK}", file=sys.stderr)
        return
    if not method.factorizes or method.spectrum is None:
        raise UserError(f"allocation '{recipe.allocation}' needs a low-rank method; '{method.name}' has no rank to allocate")
    if recipe.allocation != "global":
        return  # energy: a fraction of each module's own spectrum, free of its scale
    weight = allocation_weight(recipe, method)
    if weight == "raw" and method.spectrum_units == "scaled":
        raise UserError(f"allocation 'global' with weight 'raw' compares singular values across modules, but "
                        f"'{method.name}' scales each module's spectrum arbitrarily; set "
                        "allocation_options.weight: relative")
    if weight == "loss" and method.spectrum_units != "output":
        raise UserError(f"allocation weight 'loss' needs a spectrum of output errors (svd-llm); '{method.name}' "
                        f"gives a {SPECTRUM_UNITS[method.spectrum_units]}; set allocation_options.weight: relative")
    if warn and weight == "raw" and method.spectrum_units == "output":
        print(f"warning: {RAW_OUTPUT_RISK}", file=sys.stderr)


# Why `weight: raw` over output errors is allowed only when asked for, and then with this line.
RAW_OUTPUT_RISK = ("allocation 'global' with weight 'raw' compares output errors across depths, whose scale grows "
                   "with the residual stream (SmolLM2, svd-llm-40: perplexity 1331 against 151.8 uniform); weight "
                   "'loss' (the default) compares their effect on the loss")


def _budget(shapes: dict, options) -> int:
    """What `uniform` would store for these targets: global allocation redistributes exactly that budget (never
    more), so the two are compared at equal size."""
    total = 0
    for m, n in shapes.values():
        rank, _ = resolve_rank(m, n, options)
        total += m * n if rank is None else rank * (m + n)
    return total


def loss_weights(fisher: dict, names) -> dict[str, torch.Tensor]:
    """name -> √h per output channel (fp64), h the squared output gradients of the Fisher pass, all divided by one
    common constant (their mean over every channel of every target): only ratios across modules matter."""
    missing = [name for name in names if name not in fisher or fisher[name].output_grad_sq is None]
    if missing:
        raise ValueError(f"allocation weight 'loss' needs output gradients from collect_fisher; none for {missing[0]}")
    h = {name: fisher[name].output_grad_sq.to(torch.float64).clamp(min=0) for name in names}
    scale = float(torch.cat(list(h.values())).mean()) if h else 0.0
    if not scale > 0:
        raise ValueError("allocation weight 'loss': the LM loss has zero gradient at every target's output")
    return {name: (v / scale).sqrt() for name, v in h.items()}


@torch.no_grad()
def allocate_ranks(recipe, method, options, layer_targets, statistics, fisher=None
                   ) -> dict[str, tuple[int | None, float | None]]:
    """name -> (rank or None for "keep dense", predicted relative output error), from every layer's statistics
    (a CalibrationStatistics). compressor/pipeline/planning.py does the same keeping only the spectra.

    `fisher`: collect_fisher's result for these targets, needed by `weight: loss` (its `output_grad_sq`)."""
    plan = Spectra(recipe, method, options, layer_targets, fisher)
    for index, (groups, stats) in enumerate(statistics.layers):
        plan.add_layer(index, groups, stats)
    return plan.allocate()


class Spectra:
    """The spectra rank allocation needs, gathered one layer at a time (a layer's statistics can be freed right
    after `add_layer`), then `allocate()` over all of them."""

    def __init__(self, recipe, method, options, layer_targets, fisher=None):
        validate_allocation(recipe, method, warn=False)  # the run said it once, before calibration
        self.recipe, self.method, self.options, self.layer_targets = recipe, method, options, layer_targets
        self.weight = allocation_weight(recipe, method)
        self.by_loss = self.weight == "loss"
        if self.by_loss and fisher is None:
            raise ValueError("allocation weight 'loss' needs the Fisher pass (compressor.pipeline.fisher.collect_fisher)")
        self.scales = loss_weights(fisher, [n for t in layer_targets for n in t]) if self.by_loss else {}
        self.spectra, self.weighted, self.shapes, self.choices = {}, {}, {}, {}

    @torch.no_grad()
    def add_layer(self, index: int, groups: dict[str, list[str]], stats: dict) -> None:
        targets = self.layer_targets[index]
        for owner, names in groups.items():
            for name in names:
                W = targets[name].weight.detach().to(torch.float32)[None]
                self.shapes[name] = tuple(W.shape[1:])
                if self.method.choices is not None:
                    self.choices[name] = self.method.choices(W[0], stats[owner], self.options, self.scales.get(name))
                    continue
                self.spectra[name] = self.method.spectrum(W, stats[owner], self.options)[0].cpu()
                if self.by_loss:  # rows of W are output channels: diag(√h)·W weighs the output error by h
                    d = self.scales[name].to(W.device)[None, :, None]
                    self.weighted[name] = self.method.spectrum(W.double() * d, stats[owner], self.options)[0].cpu()
            stats[owner].release_derived()

    def allocate(self) -> dict[str, tuple[int | None, float | None]]:
        if self.method.choices is not None:
            return self._allocate_bytes()
        opts, spectra, shapes = self.recipe.allocation_options, self.spectra, self.shapes
        if self.recipe.allocation == "energy":
            ranks = allocate_energy(spectra, shapes, opts.energy)
        elif self.by_loss:
            ranks = allocate_global(self.weighted, shapes, _budget(shapes, self.options), weight="raw",
                                    min_rank=opts.min_rank)
        else:
            ranks = allocate_global(spectra, shapes, _budget(shapes, self.options), weight=self.weight,
                                    min_rank=opts.min_rank)
        ranks = {name: round_rank(r, getattr(self.options, "rank_multiple", None)) for name, r in ranks.items()}
        return {
            name: (ranks[name], None if ranks[name] is None else predicted_relative_error(spectra[name], ranks[name]))
            for name in spectra
        }

    def _allocate_bytes(self) -> dict:
        """Byte budget: size_ratio × the targets' dense bytes in the output dtype (`dense_bits`, which the pipeline
        fills in), one encoding per target."""
        element = (self.options.dense_bits or 16) // 8
        budget = self.options.size_ratio * sum(m * n * element for m, n in self.shapes.values())
        offered = self.choices
        if self.weight == "relative":  # errors relative to each target's ‖W X‖²
            offered = {name: [replace(c, error=c.predicted ** 2) for c in cs] for name, cs in offered.items()}
        chosen = allocate_bytes(offered, budget)
        return {name: (c.encoding, c.predicted) for name, c in chosen.items()}


def allocation_weight(recipe, method=None) -> str | None:
    """The weight `global` compares errors with (the recipe's, else the method's default); None for `uniform` and
    `energy`, which compare nothing across modules."""
    if recipe.allocation != "global":
        return None
    return recipe.allocation_options.weight_for(method.name if method is not None else recipe.method)


def needs_output_gradients(recipe) -> bool:
    """Whether rank allocation needs the Fisher pass's output gradients (`global` with `weight: loss`)."""
    return allocation_weight(recipe) == "loss"
