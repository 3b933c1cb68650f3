"""The public Python API. The CLI is a thin layer over these functions.

    from compressor import load_model, compress, evaluate
    loaded = load_model("Qwen/Qwen2.5-0.5B")                  # or a local directory
    result = compress(loaded.model, "svd-llm-20", tokenizer=loaded.tokenizer)
    result.save("out/", tokenizer=loaded.tokenizer)
    evaluate(result.model, loaded.tokenizer).ppl
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from compressor import registry
from compressor.allocation import allocate_ranks, needs_output_gradients, validate_allocation
from compressor.apply import ModuleReport, compress_layer
from compressor.data import calibration_batch, eval_windows, load_texts
from compressor.errors import UserError
from compressor.evaluate import PerplexityResult, perplexity
from compressor.fisher import FisherDiag, fisher_of_targets, per_module_fisher
from compressor.recipe import Recipe, load_recipe
from compressor.planning import plan_ranks
from compressor.refine import RefineReport, refine_block
from compressor.sequential import run_sequential
from compressor.stats import Stats
from compressor.targets import find_decoder_layers, select_targets

REPORT_STATS = frozenset({"gram"})  # the report's output error needs the Gram of every target


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    storage_dtype: torch.dtype  # the checkpoint's dtype: outputs are saved in it


def resolve_dtype(name: str, device: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        # Half precision on CPU is slow and lossy for the fp64 maths around it: compute in fp32 there.
        return torch.float32 if str(device).startswith("cpu") else checkpoint_dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise UserError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16") from None


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(
    name_or_path: str, *, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
    keep_on_cpu: bool = False,
) -> LoadedModel:
    """A causal LM and its tokenizer from a local directory or a hub id (lrc checkpoints included).

    `device` is where it will compute (it decides dtype "auto"); with `keep_on_cpu` the weights stay in CPU
    memory so the layer-by-layer runner can move one decoder layer at a time to the device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise UserError(f"model path not found or not a directory: {name_or_path}")
    if looks_local and not (path / "config.json").is_file():
        raise UserError(f"not a model directory (no config.json): {name_or_path}")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        storage = checkpoint_dtype(config)
        compute = resolve_dtype(dtype, device, storage)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=compute, trust_remote_code=trust_remote_code
        ).to("cpu" if keep_on_cpu else device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, SafetensorError):
            reason = f"{_unreadable_weights(path) or 'a weight file'} is corrupt or truncated ({reason})"
        raise UserError(f"cannot load model '{name_or_path}': {reason}") from None
    model.eval()
    check_finite(model.named_parameters(), name_or_path)
    return LoadedModel(model, tokenizer, name_or_path, storage)


def check_finite(named_tensors, source: str) -> None:
    """Refuse weights holding NaN or Inf before any work: every method would spread them, silently or not."""
    for name, t in named_tensors:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            what = " and ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "Inf")) if count)
            raise UserError(f"weight {name} of '{source}' holds {what} values; lrc needs finite weights")


def _unreadable_weights(folder: Path) -> str | None:
    """The name of the first .safetensors file of `folder` whose header safetensors cannot read."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError):
            return file.name
    return None


@dataclass
class CompressionResult:
    model: nn.Module
    recipe: Recipe
    modules: list[ModuleReport]
    timings: dict[str, float] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    storage_dtype: torch.dtype | None = None  # the checkpoint's dtype; save() writes the weights in it
    refinement: list[RefineReport] = field(default_factory=list)  # per decoder layer, when the recipe refines
    resumed_from: int = 0  # decoder layers an interrupted run had finished (compress(journal=...)); 0: none

    def specs(self) -> dict[str, dict]:
        return {m.name: m.spec for m in self.modules if m.compressed}

    def save(self, out_dir, *, tokenizer=None, report: dict | None = None, report_md="", overwrite=False,
             extra_files: dict | None = None):
        """`report_md`: the markdown text, or a function of the report rendering it after the save time is in."""
        from compressor.io import save_compressed

        if self.storage_dtype is not None:
            self.model.to(self.storage_dtype)  # exact: compress() rounded the weights through this dtype
        start = time.perf_counter()
        extra = {"recipe.yaml": self.recipe.to_yaml(), **(extra_files or {})}
        if report is not None:
            def report_json():  # called once the weights are written, so the report records the save time
                report.setdefault("timings_seconds", {})["save"] = round(time.perf_counter() - start, 3)
                return json.dumps(report, indent=2)

            extra["report.json"] = report_json
            extra["report.md"] = (lambda: report_md(report)) if callable(report_md) else report_md
        return save_compressed(
            self.model,
            out_dir,
            tokenizer=tokenizer,
            modules=self.specs(),
            method=self.recipe.method,
            recipe_name=self.recipe.name,
            extra_files=extra,
            overwrite=overwrite,
        )


@dataclass
class CalibrationStatistics:
    """Statistics of every target of the *dense* model, layer by layer: reusable by every recipe whose
    `sequential.inputs` is "dense" (the inputs then do not depend on the recipe)."""

    needs: frozenset
    layers: list[tuple[dict[str, list[str]], dict[str, Stats]]]  # per layer: (groups, stats by owner)
    targets: tuple[tuple[str, ...], ...]


def calibration_data(tokenizer, recipe: Recipe, calib: str | None = None, *, loaded_texts=None):
    """(token windows nsamples × seqlen, description). `loaded_texts`: a `load_texts` result already in hand."""
    texts, description = loaded_texts or load_texts(calib, split_default="train")
    c = recipe.calibration
    batches = calibration_batch(tokenizer, texts, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed)
    return batches, {"source": description, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed}


def _as_recipe(recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def collect_statistics(model, batches: torch.Tensor, recipes, *, device="cpu", batch_size=8, progress=None,
                       fisher: dict[str, FisherDiag] | None = None):
    """One dense calibration pass gathering what all `recipes` need (they must agree on targets).

    When a recipe needs "fisher", the Fisher pass runs first (or `fisher` from `collect_fisher` is reused) and
    every target gets its own Stats (see fisher.per_module_fisher)."""
    recipes = [_as_recipe(r) for r in recipes]
    needs = REPORT_STATS.union(*(registry.get(r.method).needs_for(r.method_options()) for r in recipes))
    layer_targets = select_targets(model, recipes[0].targets, recipes[0].ignore)
    layers = []
    if "fisher" in needs and fisher is None:
        fisher = fisher_of_targets(model, batches, layer_targets, device=device, batch_size=batch_size)

    def keep(index, collector):
        groups, stats = collector.groups(), {k: _to_cpu(v) for k, v in collector.stats.items()}
        layers.append(per_module_fisher(groups, stats, fisher) if "fisher" in needs else (groups, stats))

    run_sequential(model, batches, layer_targets, needs, keep, device=device, batch_size=batch_size,
                   propagate="dense", progress=progress, skip_first=recipes[0].calibration.skip_first)
    names = tuple(tuple(t) for t in layer_targets)
    return CalibrationStatistics(needs, layers, names)


def _to_cpu(s: Stats) -> Stats:
    move = lambda t: None if t is None else t.cpu()  # noqa: E731
    gram = move(s.gram)
    return Stats(count=s.count, gram=gram, abs_sum=move(s.abs_sum), fisher=move(s.fisher),
                 fisher_in=move(s.fisher_in), cross=gram if s.cross is s.gram else move(s.cross))




def compress(
    model: nn.Module,
    recipe,
    *,
    tokenizer=None,
    calib: str | None = None,
    batches: torch.Tensor | None = None,
    statistics: CalibrationStatistics | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    storage_dtype: torch.dtype | None = None,
    progress=None,
    layer_io=None,
    journal=None,
) -> CompressionResult:
    """Compress `model` in place with `recipe` (a Recipe, a built-in name or a YAML path).

    Calibration comes from `batches` (token ids, nsamples x seqlen), else from `calib` / the bundled text via
    `tokenizer`. With `statistics` from `collect_statistics` and a recipe whose inputs are "dense", no
    calibration forward pass runs at all. `storage_dtype`: the dtype the checkpoint will be saved in; the
    compressed weights are rounded through it so that the in-memory model equals what gets saved. `layer_io`:
    decoder layers loaded lazily from disk (use compressor.streaming.compress_streaming rather than by hand).
    `journal` (compressor/journal.py): record each finished layer, and resume after the last one an interrupted
    run with the same journal finished; the result is identical to an uninterrupted run's.
    """
    recipe = _as_recipe(recipe)
    method = registry.get(recipe.method)
    validate_allocation(recipe, method)
    options = recipe.method_options()
    needs = method.needs_for(options) | REPORT_STATS
    timings: dict[str, float] = {}
    started = time.perf_counter()
    layer_targets = select_targets(model, recipe.targets, recipe.ignore)
    if method.factorizes:  # (a residual's rank, as EoRA's, is capped at full rank instead: nothing to refuse)
        _check_fixed_rank(getattr(options, "rank", None), layer_targets)
    expected = sum(len(t) for t in layer_targets)
    reports: list[ModuleReport] = []
    calibration: dict = {}

    allocated = None
    fisher = None

    def decompose_layer(index, groups, stats):
        t0 = time.perf_counter()
        if layer_targets[index]:
            reports.extend(compress_layer(model, layer_targets[index], groups, stats, method, options, allocated,
                                          storage_dtype=storage_dtype))
        timings["decomposition"] = timings.get("decomposition", 0.0) + time.perf_counter() - t0

    def on_layer(index, collector):  # once per layer, or once per group of it (sequential.granularity: group)
        missing = [n for n in collector.modules if n not in collector.owner]
        if missing:
            raise RuntimeError(f"{missing[0]} was never called during calibration; cannot compress it")
        groups, stats = collector.groups(), collector.stats
        if fisher is not None:
            groups, stats = per_module_fisher(groups, stats, fisher)
        decompose_layer(index, groups, stats)

    refinements: list[RefineReport] = []

    def refine(index, layer, calls, targets, device_, offload):
        t0 = time.perf_counter()
        done = {m.name for m in reports if m.compressed}
        modules = [model.get_submodule(name) for name in layer_targets[index] if name in done]
        r = recipe.refine
        report, outs = refine_block(layer, modules, calls, targets, epochs=r.epochs, lr=r.lr, batch_size=r.batch_size,
                                    seed=r.seed, skip_first=recipe.calibration.skip_first, device=device_,
                                    offload=offload, index=index, relative_lr=r.relative_lr)
        refinements.append(report)
        timings["refinement"] = timings.get("refinement", 0.0) + time.perf_counter() - t0
        return outs

    resumed = journal.resumed() if journal is not None else None
    start = resumed.done if resumed is not None else 0
    if resumed is not None:
        reports.extend(_module_report(d) for d in resumed.state["modules"])
        refinements.extend(RefineReport(**d) for d in resumed.state["refinement"])

    def layer_done(index, layer, hidden, dense_hidden):
        tensors = None
        if layer_io is None:  # the output is written at the end: the journal keeps the compressed layer meanwhile
            prefix = f"{find_decoder_layers(model)[0]}.{index}."
            tensors = {prefix + k: v for k, v in layer.state_dict().items()}
        state = {"modules": [m.to_dict() for m in reports], "refinement": [r.to_dict() for r in refinements]}
        journal.record(index + 1, hidden, dense_hidden, state, tensors)

    if layer_io is not None:
        _check_streamable(recipe, statistics)
    if statistics is not None and not _dense_statistics_suffice(recipe):
        raise ValueError("precomputed statistics apply only to recipes with sequential.inputs: dense, "
                         "sequential.granularity: layer and no refinement")
    if batches is None and statistics is None:
        if tokenizer is None:
            raise ValueError("compress() needs `batches` or a `tokenizer` to build calibration data")
        t0 = time.perf_counter()
        batches, calibration = calibration_data(tokenizer, recipe, calib)
        timings["calibration_data"] = time.perf_counter() - t0
    if "fisher" in needs and statistics is None:  # on the dense model, before anything is compressed
        t0 = time.perf_counter()
        fisher = fisher_of_targets(model, batches, layer_targets, device=device, batch_size=batch_size,
                                   layer_io=layer_io)
        timings["fisher"] = time.perf_counter() - t0
    if recipe.allocation != "uniform":
        t0 = time.perf_counter()
        loss_fisher = fisher  # `weight: loss` reads the output gradients of the same dense Fisher pass
        if needs_output_gradients(recipe) and loss_fisher is None:
            if batches is None:
                raise ValueError("allocation weight 'loss' runs a Fisher pass: it needs calibration `batches` "
                                 "(precomputed statistics hold no gradients)")
            loss_fisher = fisher_of_targets(model, batches, layer_targets, device=device, batch_size=batch_size,
                                            layer_io=layer_io)
            timings["fisher"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        if statistics is None and _dense_statistics_suffice(recipe) and layer_io is None:
            # The decompositions use exactly these statistics: keep them, and skip the second calibration pass.
            statistics = collect_statistics(model, batches, [recipe], device=device, batch_size=batch_size,
                                            fisher=fisher)
        if statistics is not None:
            allocated = allocate_ranks(recipe, method, options, layer_targets, statistics, fisher=loss_fisher)
        else:  # a planning pass that keeps only the spectra (and reads layers from disk with --low-memory)
            allocated = plan_ranks(model, batches, recipe, method, options, layer_targets, needs, fisher=fisher,
                                   loss_fisher=loss_fisher, device=device, batch_size=batch_size, layer_io=layer_io)
        timings["allocation"] = time.perf_counter() - t0
    if resumed is not None:  # after the dense passes above (Fisher, allocation): they need every layer dense
        _restore_finished_layers(model, reports, journal if layer_io is None else None, start)
        if layer_io is not None:
            layer_io.resume(start)
    if statistics is not None:
        if not needs <= statistics.needs:
            raise ValueError(f"statistics lack {sorted(needs - statistics.needs)} needed by {method.name}")
        if tuple(tuple(t) for t in layer_targets) != statistics.targets:
            raise ValueError("statistics were collected for other targets than this recipe's")
        for index, (groups, stats) in enumerate(statistics.layers):
            if index >= start:
                decompose_layer(index, groups, stats)
                if journal is not None:
                    layer_done(index, find_decoder_layers(model)[1][index], [], None)
            if progress is not None:
                progress(index)
    else:
        run_sequential(model, batches, layer_targets, needs, on_layer, device=device,
                       batch_size=batch_size, propagate=recipe.sequential.inputs, progress=progress, layer_io=layer_io,
                       granularity=recipe.sequential.granularity, skip_first=recipe.calibration.skip_first,
                       refine=refine if recipe.refine.epochs > 0 else None, refine_target=recipe.refine.target,
                       start=start, start_hidden=resumed and (resumed.hidden, resumed.dense_hidden),
                       on_layer_done=layer_done if journal is not None else None)
        timings["statistics"] = time.perf_counter() - started - sum(timings.values())
    if len(reports) != expected:
        raise RuntimeError(f"failed to compress {expected - len(reports)} of {expected} target modules")
    if storage_dtype is not None:
        _round_through(model, storage_dtype)
    timings["compress_total"] = time.perf_counter() - started
    return CompressionResult(model, recipe, reports, timings, calibration, storage_dtype, refinements, start)


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


def _restore_finished_layers(model: nn.Module, reports: list[ModuleReport], journal, done: int) -> None:
    """Swap in the compressed modules of layers 0..done-1 and, from `journal`, load their tensors as the interrupted
    run left them (without it, they stay where the layers are: on the meta device of a --low-memory run)."""
    from compressor.hf_integration import replace_linears
    from safetensors.torch import load_file

    path, layers = find_decoder_layers(model)
    replace_linears(model, {m.name: m.spec for m in reports if m.compressed})
    for index in range(done if journal is not None else 0):
        prefix = f"{path}.{index}."
        tensors = load_file(journal.layer_file(index))
        layers[index].load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=True, assign=True)


def _dense_statistics_suffice(recipe: Recipe) -> bool:
    """The dense model's statistics are all the recipe uses: no layer sees anything compressed before it."""
    return (recipe.sequential.inputs == "dense" and recipe.sequential.granularity == "layer"
            and recipe.refine.epochs == 0)


def _check_streamable(recipe: Recipe, statistics) -> None:
    """Precomputed statistics hold every layer's Grams in memory: not for a --low-memory run."""
    if statistics is not None:
        raise ValueError("precomputed statistics cannot be combined with lazily loaded layers")


@torch.no_grad()
def _round_through(model: nn.Module, dtype: torch.dtype) -> None:
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.copy_(p.to(dtype))


def evaluate(model, tokenizer, data: str | None = None, *, seqlen: int = 2048, batch_size: int = 4,
             device=None, max_windows: int | None = None, progress=None) -> PerplexityResult:
    """Perplexity on `data` (file/folder/hub dataset; default the bundled test split), papers' protocol."""
    texts, description = load_texts(data, split_default="test")
    windows = eval_windows(tokenizer, texts, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    result = perplexity(model, windows, batch_size=batch_size, device=device, progress=progress)
    return dataclasses.replace(result, data=description)


def load_compressed(path, *, dtype=None, device=None):
    from compressor.io import load_compressed as _load

    return _load(path, dtype=dtype, device=device)
