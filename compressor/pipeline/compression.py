"""One compression of a model with a recipe, as a sequence of steps (`compress_model` runs them in order):

    1. targets     which linears the recipe touches; a fixed rank checked against their shapes
    2. fisher      the dense model's Fisher diagonal, when the method or the rank allocation needs it
    3. allocate    ranks under the recipe's global budget (`allocation: energy | global`): from the caller's
                   statistics, or a planning pass that keeps only spectra (compressor/pipeline/planning.py)
    4. resume      the layers an interrupted run finished, from its journal (compressor/pipeline/journal.py)
    5. compress    layer by layer: the runner (compressor/pipeline/sequential.py) calibrates each decoder layer, calls back
                   `on_layer` (decompose + swap), `refine` (block refinement) and `layer_done` (journal), or, with
                   precomputed dense statistics, no calibration pass at all
    6. result      every target accounted for, weights rounded through the storage dtype

Methods stay pure functions (compressor/methods/); nothing here names one. Where the decoder layers live (memory,
or on disk with `layer_io`) is the runner's business.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from compressor import registry
from compressor.budget.allocation import allocate_ranks, needs_output_gradients, validate_allocation
from compressor.pipeline import distributed
from compressor.pipeline.apply import ModuleReport, compress_layer, with_dense_bits
from compressor.errors import UserError
from compressor.pipeline.fisher import fisher_of_targets, per_module_fisher
from compressor.pipeline.planning import plan_ranks
from compressor.pipeline.refine import RefineReport, refine_block
from compressor.pipeline.result import CompressionResult, calibration_data
from compressor.pipeline.sequential import run_sequential
from compressor.pipeline.stats import Stats
from compressor.pipeline.targets import find_decoder_layers, select_targets

# The report's output error needs every target's Gram. "report_gram": in fp32 where no method asks for "gram" itself
# (rtn, svd, asvd, fwsvd): half the bytes of the largest statistic (a 70B down_proj's 28672² Gram: 3.3 GB, not 6.6)
# and of its error products; a ratio of two traces needs no fp64 (compressor/pipeline/stats.py).
REPORT_STATS = frozenset({"report_gram"})


@dataclass
class CalibrationStatistics:
    """Statistics of every target of the *dense* model, layer by layer: reusable by every recipe whose
    `sequential.inputs` is "dense" (the inputs then do not depend on the recipe)."""

    needs: frozenset
    layers: list[tuple[dict[str, list[str]], dict[str, Stats]]]  # per layer: (groups, stats by owner)
    targets: tuple[tuple[str, ...], ...]


def collect_statistics(model, batches: torch.Tensor, recipes, *, device="cpu", batch_size=8, progress=None,
                       fisher=None, layer_targets=None) -> CalibrationStatistics:
    """One dense calibration pass gathering what all `recipes` (Recipe objects) need; they must agree on targets
    (`layer_targets`: already selected with them).

    When a recipe needs "fisher", the Fisher pass runs first (or `fisher` from `collect_fisher` is reused) and
    every target gets its own Stats (see fisher.per_module_fisher)."""
    needs = REPORT_STATS.union(*(registry.get(r.method).needs_for(r.method_options()) for r in recipes))
    if layer_targets is None:
        layer_targets = select_targets(model, recipes[0].targets, recipes[0].ignore)
    layers = []
    if "fisher" in needs and fisher is None:
        fisher = fisher_of_targets(model, batches, layer_targets, device=device, batch_size=batch_size)

    def keep(index, collector):
        groups, stats = collector.groups(), {k: _to_cpu(v) for k, v in collector.stats.items()}
        layers.append(per_module_fisher(groups, stats, fisher) if "fisher" in needs else (groups, stats))

    run_sequential(model, batches, layer_targets, needs, keep, device=device, batch_size=batch_size,
                   propagate="dense", progress=progress, skip_first=recipes[0].calibration.skip_first)
    return CalibrationStatistics(needs, layers, tuple(tuple(t) for t in layer_targets))


def _to_cpu(s: Stats) -> Stats:
    move = lambda t: None if t is None else t.cpu()  # noqa: E731
    gram = move(s.gram)
    return Stats(count=s.count, gram=gram, abs_sum=move(s.abs_sum), fisher=move(s.fisher),
                 fisher_in=move(s.fisher_in), cross=gram if s.cross is s.gram else move(s.cross))


def dense_statistics_suffice(recipe) -> bool:
    """The dense model's statistics are all the recipe uses: no layer sees anything compressed before it."""
    return (recipe.sequential.inputs == "dense" and recipe.sequential.granularity == "layer"
            and recipe.refine.epochs == 0)


class Compression:
    """The state of one compression across its steps, and the callbacks the layer runner makes."""

    def __init__(self, model: nn.Module, recipe, *, device="cpu", batch_size=8, storage_dtype=None, progress=None,
                 layer_io=None, journal=None, layer_targets=None):
        self.model, self.recipe, self.device, self.batch_size = model, recipe, device, batch_size
        self.layer_targets = layer_targets
        self.storage_dtype, self.progress, self.layer_io, self.journal = storage_dtype, progress, layer_io, journal
        self.method = registry.get(recipe.method)
        validate_allocation(recipe, self.method)
        self.options = recipe.method_options()
        self.needs = self.method.needs_for(self.options) | REPORT_STATS
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()
        self.reports: list[ModuleReport] = []
        self.refinements: list[RefineReport] = []
        self.allocated = None
        self.fisher = None
        self.start = 0  # decoder layers finished by an interrupted run
        self.resumed = None
        distributed.set_chunk(batch_size)  # how a journal shared by several processes lays out their windows

    # 1. ------------------------------------------------------------------------------------------------------------
    def select_targets(self, statistics: CalibrationStatistics | None) -> None:
        """The recipe's targets, unless the caller selected them already (a run selects them once, up front)."""
        if self.layer_targets is None:
            self.layer_targets = select_targets(self.model, self.recipe.targets, self.recipe.ignore)
        if self.method.factorizes:  # (a residual's rank, as EoRA's, is capped at full rank instead)
            _check_fixed_rank(getattr(self.options, "rank", None), self.layer_targets)
        if statistics is not None:
            if self.layer_io is not None:
                raise ValueError("precomputed statistics cannot be combined with lazily loaded layers")
            if not dense_statistics_suffice(self.recipe):
                raise ValueError("precomputed statistics apply only to recipes with sequential.inputs: dense, "
                                 "sequential.granularity: layer and no refinement")

    # 2. ------------------------------------------------------------------------------------------------------------
    def fisher_pass(self, batches, statistics) -> None:
        """On the dense model, before anything is compressed (the paper's Fisher is the original model's)."""
        if "fisher" in self.needs and statistics is None:
            t0 = time.perf_counter()
            self.fisher = self._fisher(batches)
            self.timings["fisher"] = time.perf_counter() - t0

    def _fisher(self, batches):
        return fisher_of_targets(self.model, batches, self.layer_targets, device=self.device,
                                 batch_size=self.batch_size, layer_io=self.layer_io)

    # 3. ------------------------------------------------------------------------------------------------------------
    def allocate(self, batches, statistics):
        """Ranks for `allocation: energy | global`; returns the statistics the decompositions will use: the
        caller's, or None (each layer's are computed in the layer pass: never more than one layer's held)."""
        recipe = self.recipe
        if recipe.allocation == "uniform":
            return statistics
        t0 = time.perf_counter()
        options = with_dense_bits(self.options, self.storage_dtype or _first_dtype(self.layer_targets))
        loss_fisher = self.fisher  # `weight: loss` reads the output gradients of the same dense Fisher pass
        if needs_output_gradients(recipe) and loss_fisher is None:
            if batches is None:
                raise ValueError("allocation weight 'loss' runs a Fisher pass: it needs calibration `batches` "
                                 "(precomputed statistics hold no gradients)")
            loss_fisher = self._fisher(batches)
            self.timings["fisher"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        # Without the caller's statistics, a planning pass keeps only spectra, even when the decompositions will
        # use the same dense statistics: keeping them would hold every layer's fp64 Grams at once (~44 GB at
        # 7B), so the layer pass computes each layer's again (one more calibration pass, one layer held).
        if statistics is not None:
            self.allocated = allocate_ranks(recipe, self.method, options, self.layer_targets, statistics,
                                            fisher=loss_fisher)
        else:  # a planning pass that keeps only the spectra (and reads layers from disk with --low-memory)
            self.allocated = plan_ranks(self.model, batches, recipe, self.method, options, self.layer_targets,
                                        self.needs, fisher=self.fisher, loss_fisher=loss_fisher, device=self.device,
                                        batch_size=self.batch_size, layer_io=self.layer_io)
        self.timings["allocation"] = time.perf_counter() - t0
        return statistics

    # 4. ------------------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """After the dense passes (Fisher, allocation), which need every layer dense."""
        self.resumed = self.journal.resumed() if self.journal is not None else None
        if self.resumed is None:
            return
        self.start = self.resumed.done
        self.reports.extend(_module_report(d) for d in self.resumed.state["modules"])
        self.refinements.extend(RefineReport(**d) for d in self.resumed.state["refinement"])
        from compressor.nn.hf_integration import replace_linears

        replace_linears(self.model, {m.name: m.spec for m in self.reports if m.compressed})
        if self.layer_io is not None:
            self.layer_io.resume(self.start)  # the finished layers' shards are in the output already
        else:
            path, layers = find_decoder_layers(self.model)
            for index in range(self.start):
                layers[index].load_state_dict(self.journal.layer_tensors(index, f"{path}.{index}."), strict=True,
                                              assign=True)

    # 5. ------------------------------------------------------------------------------------------------------------
    def compress_layers(self, batches, statistics) -> None:
        if statistics is not None:
            self._from_statistics(statistics)
            return
        recipe, resumed = self.recipe, self.resumed
        run_sequential(self.model, batches, self.layer_targets, self.needs, self.on_layer, device=self.device,
                       batch_size=self.batch_size, propagate=recipe.sequential.inputs, progress=self.progress,
                       layer_io=self.layer_io, granularity=recipe.sequential.granularity,
                       skip_first=recipe.calibration.skip_first,
                       refine=self.refine if recipe.refine.epochs > 0 else None, refine_target=recipe.refine.target,
                       start=self.start, start_hidden=resumed and (resumed.hidden, resumed.dense_hidden),
                       on_layer_done=self.layer_done if self.journal is not None else None)
        self.timings["statistics"] = time.perf_counter() - self.started - sum(self.timings.values())

    def _from_statistics(self, statistics: CalibrationStatistics) -> None:
        if not self.needs <= statistics.needs:
            raise ValueError(f"statistics lack {sorted(self.needs - statistics.needs)} needed by {self.method.name}")
        if tuple(tuple(t) for t in self.layer_targets) != statistics.targets:
            raise ValueError("statistics were collected for other targets than this recipe's")
        for index, (groups, stats) in enumerate(statistics.layers):
            if index >= self.start:  # (copies: the decomposition drops each input's statistics, not the caller's)
                self._decompose(index, groups, {owner: copy.copy(s) for owner, s in stats.items()})
                if self.journal is not None:
                    self.layer_done(index, find_decoder_layers(self.model)[1][index], [], None)
            if self.progress is not None:
                self.progress(index)

    def on_layer(self, index, collector) -> None:
        """The runner's callback once per layer, or once per group of it (sequential.granularity: group)."""
        missing = [n for n in collector.modules if n not in collector.owner]
        if missing:
            raise RuntimeError(f"{missing[0]} was never called during calibration; cannot compress it")
        groups, stats = collector.groups(), collector.stats
        if self.fisher is not None:
            groups, stats = per_module_fisher(groups, stats, self.fisher)
        self._decompose(index, groups, stats)

    def _decompose(self, index, groups, stats) -> None:
        t0 = time.perf_counter()
        if self.layer_targets[index]:
            # (under torchrun each group by its owner process, broadcast to the others)
            reports = distributed.compress_layer(compress_layer, self.model, self.layer_targets[index], groups, stats,
                                                 self.method, self.options, self.allocated,
                                                 storage_dtype=self.storage_dtype)
            self.reports.extend(reports)
            if self.storage_dtype is not None:  # later layers are calibrated on what the checkpoint will hold
                for report in reports:
                    if report.compressed:
                        _round_through(self.model.get_submodule(report.name), self.storage_dtype)
        self.timings["decomposition"] = self.timings.get("decomposition", 0.0) + time.perf_counter() - t0

    def refine(self, index, layer, calls, targets, device, offload):
        t0 = time.perf_counter()
        done = {m.name for m in self.reports if m.compressed}
        modules = [self.model.get_submodule(name) for name in self.layer_targets[index] if name in done]
        r = self.recipe.refine
        report, outs = refine_block(layer, modules, calls, targets, epochs=r.epochs, lr=r.lr, batch_size=r.batch_size,
                                    seed=r.seed, skip_first=self.recipe.calibration.skip_first, device=device,
                                    offload=offload, index=index, relative_lr=r.relative_lr,
                                    storage_dtype=self.storage_dtype, quantised=r.quant, quant_lr=r.quant_lr)
        self.refinements.append(report)
        self.timings["refinement"] = self.timings.get("refinement", 0.0) + time.perf_counter() - t0
        return outs

    def layer_done(self, index, layer, hidden, dense_hidden) -> None:
        tensors = None
        if self.layer_io is None:  # the output is written at the end: the journal keeps the layer meanwhile
            prefix = f"{find_decoder_layers(self.model)[0]}.{index}."
            tensors = {prefix + k: v for k, v in layer.state_dict().items()}
        state = {"modules": [m.to_dict() for m in self.reports], "refinement": [r.to_dict() for r in self.refinements]}
        self.journal.record(index + 1, hidden, dense_hidden, state, tensors)

    # 6. ------------------------------------------------------------------------------------------------------------
    def finish(self) -> None:
        expected = sum(len(t) for t in self.layer_targets)
        if len(self.reports) != expected:
            raise RuntimeError(f"failed to compress {expected - len(self.reports)} of {expected} target modules")
        if self.storage_dtype is not None:
            _round_through(self.model, self.storage_dtype)
        self.timings["compress_total"] = time.perf_counter() - self.started


def compress_model(model: nn.Module, recipe, *, layer_targets=None, tokenizer=None, calib: str | None = None,
                   batches: torch.Tensor | None = None, statistics: CalibrationStatistics | None = None,
                   device: str = "cpu", batch_size: int = 8, storage_dtype: torch.dtype | None = None, progress=None,
                   layer_io=None, journal=None) -> CompressionResult:
    """Compress `model` in place with `recipe` (a Recipe: parsed by the caller) through the steps above.
    `layer_targets`: the recipe's targets when the caller selected them already. See compressor.api.compress for
    the other arguments."""
    run = Compression(model, recipe, device=device, batch_size=batch_size, storage_dtype=storage_dtype,
                      progress=progress, layer_io=layer_io, journal=journal, layer_targets=layer_targets)
    run.select_targets(statistics)
    calibration: dict = {}
    if batches is None and statistics is None:
        if tokenizer is None:
            raise ValueError("compress() needs `batches` or a `tokenizer` to build calibration data")
        t0 = time.perf_counter()
        batches, calibration = calibration_data(tokenizer, recipe, calib)
        run.timings["calibration_data"] = time.perf_counter() - t0
    run.fisher_pass(batches, statistics)
    statistics = run.allocate(batches, statistics)
    run.resume()
    run.compress_layers(batches, statistics)
    run.finish()
    return CompressionResult(model, recipe, run.reports, run.timings, calibration, storage_dtype, run.refinements,
                             run.start)


def _first_dtype(layer_targets) -> torch.dtype:
    for targets in layer_targets:
        for module in targets.values():
            return module.weight.dtype
    return torch.float32


def _check_fixed_rank(rank: int | None, layer_targets) -> None:
    """A fixed rank above min(m, n) of a target is a mistake in the recipe, not something to round silently."""
    if rank is None:
        return
    for targets in layer_targets:
        for name, module in targets.items():
            m, n = module.weight.shape
            if rank > min(m, n):
                raise UserError(f"rank {rank} exceeds min(m, n) = {min(m, n)} of {name} ({m}×{n}); use a smaller "
                                "rank, or param_ratio / size_ratio")


def _module_report(d: dict) -> ModuleReport:
    """The inverse of ModuleReport.to_dict (its derived keys dropped): reports kept in a run's journal."""
    kept = {f.name: d[f.name] for f in dataclasses.fields(ModuleReport) if f.name in d}
    return ModuleReport(**{**kept, "shape": tuple(kept["shape"])})


@torch.no_grad()
def _round_through(model: nn.Module, dtype: torch.dtype) -> None:
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.copy_(p.to(dtype))
