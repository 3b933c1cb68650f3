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

from compressor.pipeline.apply import ModuleReport
from compressor.data import calibration_batch, eval_windows, load_texts
from compressor.errors import UserError
from compressor.report.perplexity import PerplexityResult, perplexity
from compressor.recipe import Recipe, load_recipe
from compressor.pipeline.compression import REPORT_STATS, CalibrationStatistics, Compression
from compressor.pipeline.compression import collect_statistics as _collect_statistics
from compressor.pipeline.refine import RefineReport



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
        from compressor.io.checkpoint import save_compressed

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


def calibration_data(tokenizer, recipe: Recipe, calib: str | None = None, *, loaded_texts=None):
    """(token windows nsamples × seqlen, description). `loaded_texts`: a `load_texts` result already in hand."""
    texts, description = loaded_texts or load_texts(calib, split_default="train")
    c = recipe.calibration
    batches = calibration_batch(tokenizer, texts, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed)
    return batches, {"source": description, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed}


def _as_recipe(recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


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
    decoder layers loaded lazily from disk (use compressor.pipeline.streaming.compress_streaming rather than by hand).
    `journal` (compressor/pipeline/journal.py): record each finished layer, and resume after the last one an interrupted
    run with the same journal finished; the result is identical to an uninterrupted run's.
    """
    run = Compression(model, _as_recipe(recipe), device=device, batch_size=batch_size, storage_dtype=storage_dtype,
                      progress=progress, layer_io=layer_io, journal=journal)
    run.select_targets(statistics)
    calibration: dict = {}
    if batches is None and statistics is None:
        if tokenizer is None:
            raise ValueError("compress() needs `batches` or a `tokenizer` to build calibration data")
        t0 = time.perf_counter()
        batches, calibration = calibration_data(tokenizer, run.recipe, calib)
        run.timings["calibration_data"] = time.perf_counter() - t0
    run.fisher_pass(batches, statistics)
    statistics = run.allocate(batches, statistics)
    run.resume()
    run.compress_layers(batches, statistics)
    run.finish()
    return CompressionResult(model, run.recipe, run.reports, run.timings, calibration, storage_dtype, run.refinements,
                             run.start)


def collect_statistics(model, batches: torch.Tensor, recipes, *, device="cpu", batch_size=8, progress=None,
                       fisher=None) -> CalibrationStatistics:
    """One dense calibration pass gathering what all `recipes` (built-in names, paths or Recipes) need; they must
    agree on targets. Reused by every recipe with `sequential.inputs: dense` via `compress(statistics=...)`."""
    return _collect_statistics(model, batches, [_as_recipe(r) for r in recipes], device=device,
                               batch_size=batch_size, progress=progress, fisher=fisher)


def evaluate(model, tokenizer, data: str | None = None, *, seqlen: int = 2048, batch_size: int = 4,
             device=None, max_windows: int | None = None, progress=None) -> PerplexityResult:
    """Perplexity on `data` (file/folder/hub dataset; default the bundled test split), papers' protocol."""
    texts, description = load_texts(data, split_default="test")
    windows = eval_windows(tokenizer, texts, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    result = perplexity(model, windows, batch_size=batch_size, device=device, progress=progress)
    return dataclasses.replace(result, data=description)


def load_compressed(path, *, dtype=None, device=None, fuse_siblings=False):
    from compressor.io.checkpoint import load_compressed as _load

    return _load(path, dtype=dtype, device=device, fuse_siblings=fuse_siblings)
