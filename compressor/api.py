"""The public Python API; the CLI is a thin layer over these functions, and this is the edge where what a caller
passed (recipe names, `--set` overrides, `--target-size`, paths) is checked and parsed, once.

    from compressor import load_model, compress, evaluate
    loaded = load_model("Qwen/Qwen2.5-0.5B")                  # or a local directory
    result = compress(loaded.model, "svd-llm-20", tokenizer=loaded.tokenizer)
    result.save("out/", tokenizer=loaded.tokenizer)
    evaluate(result.model, loaded.tokenizer).ppl

    from compressor.api import compress_checkpoint           # what `lrc compress` runs
    report = compress_checkpoint("Qwen/Qwen2.5-0.5B", "svd-llm-20", "out/", evaluate_ppl=True)
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from compressor import registry
from compressor.data import load_texts
from compressor.errors import UserError
from compressor.io.load import LoadedModel, check_finite, checkpoint_dtype, load_model, resolve_dtype  # noqa: F401
from compressor.io.lock import output_lock
from compressor.io.preflight import check_model_source, check_output
from compressor.pipeline import distributed
from compressor.pipeline.compression import REPORT_STATS, CalibrationStatistics, compress_model  # noqa: F401
from compressor.pipeline.compression import collect_statistics as _collect_statistics
from compressor.pipeline.journal import journal_bytes, refuse_leftover
from compressor.pipeline.result import CompressionResult, calibration_data  # noqa: F401
from compressor.pipeline.run import CompressJob, run
from compressor.recipe import Recipe, as_recipe, parse_target_size
from compressor.report.perplexity import PerplexityResult, evaluate  # noqa: F401

__all__ = ["CompressionResult", "LoadedModel", "calibration_data", "collect_statistics", "compress",
           "compress_checkpoint", "evaluate", "load_compressed", "load_model"]


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
    `journal` (compressor/pipeline/journal.py): record each finished layer, and resume after the last one an
    interrupted run with the same journal finished; the result is identical to an uninterrupted run's.
    """
    return compress_model(model, as_recipe(recipe), tokenizer=tokenizer, calib=calib, batches=batches,
                          statistics=statistics, device=device, batch_size=batch_size, storage_dtype=storage_dtype,
                          progress=progress, layer_io=layer_io, journal=journal)


def collect_statistics(model, batches: torch.Tensor, recipes, *, device="cpu", batch_size=8, progress=None,
                       fisher=None) -> CalibrationStatistics:
    """One dense calibration pass gathering what all `recipes` (built-in names, paths or Recipes) need; they must
    agree on targets. Reused by every recipe with `sequential.inputs: dense` via `compress(statistics=...)`."""
    return _collect_statistics(model, batches, [as_recipe(r) for r in recipes], device=device,
                               batch_size=batch_size, progress=progress, fisher=fisher)


def compress_checkpoint(
    model_name: str,
    recipe: str | Recipe | None,
    out: str | Path,
    *,
    overrides: tuple[str, ...] = (),
    target_size: str | float | None = None,
    calib: str | None = None,
    evaluate_ppl: bool = False,
    eval_data: str | None = None,
    eval_seqlen: int | None = None,
    eval_max_windows: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    show_progress: bool = True,
    with_plots: bool = True,
    low_memory: bool = False,
    resume: bool = False,
) -> dict:
    """Compress the checkpoint `model_name` (local directory or hub id) into the directory `out`, as `lrc compress`
    does; returns the report. `recipe`: a Recipe, a built-in name or a YAML path (None with `target_size`: auto).
    `target_size`: the whole checkpoint's weights in at most a size ("4.5GB", "800MiB", a byte count) or a fraction
    of the dense checkpoint's bytes (0.35); the targets' share of their own bytes is the recipe's `size_ratio`, which
    the run derives from it (so it cannot be `--set` too). `resume`: finish the run
    an interruption left in `.OUT.partial/` (compressor/pipeline/journal.py); without it such a leftover is refused.

    Every user error is detected here, before the model is loaded (model source, output directory, recipe,
    calibration and evaluation text), so bad input fails in a second with one line and nothing on disk."""
    if recipe is None and target_size is None:
        raise UserError("compress needs --recipe (lrc recipes list) or --target-size")
    target = None if target_size is None else parse_target_size(str(target_size))
    out = Path(out)
    source_bytes = check_model_source(model_name)  # a typo'd path: one line now, not hub retries
    parsed = as_recipe("auto" if recipe is None else recipe, tuple(overrides))
    if target is not None:
        _check_budgetable(parsed, overrides)
    check_output(out, overwrite=overwrite, expected_bytes=source_bytes, source=model_name,  # not after the run
                 journal_bytes=journal_bytes(model_name, source_bytes, parsed, low_memory=low_memory, device=device,
                                             dtype=dtype))
    # one run per output, until it is published (under torchrun rank 0's: it alone writes; pipeline/distributed.py)
    with output_lock(out) if distributed.is_writer() else nullcontext():
        refuse_leftover(out, resume)
        calib_texts = load_texts(calib, split_default="train")  # fail fast on a missing/empty calibration file
        if evaluate_ppl:
            if low_memory:
                raise UserError("--eval needs the whole model in memory; with --low-memory, run `lrc eval OUT` on a "
                                "machine that holds it")
            load_texts(eval_data, split_default="test")
        return run(CompressJob(
            source=model_name, recipe=parsed, out=out, calib_texts=calib_texts, overrides=tuple(overrides),
            target_size=target, target_size_text=None if target is None else str(target_size),
            evaluate=evaluate_ppl, eval_data=eval_data, eval_seqlen=eval_seqlen,
            eval_max_windows=eval_max_windows, device=device, dtype=dtype, overwrite=overwrite,
            trust_remote_code=trust_remote_code, show_progress=show_progress, with_plots=with_plots,
            low_memory=low_memory, resume=resume))


def _check_budgetable(recipe: Recipe, overrides) -> None:
    """--target-size becomes the targets' size_ratio: the recipe's method must take one, and no --set may size
    the targets another way (size_ratio, or the rank / param_ratio it excludes)."""
    try:
        recipe.with_overrides(("size_ratio=0.5",))
    except UserError:
        raise UserError(f"--target-size needs a recipe whose method takes size_ratio (auto, svd-llm, ...); recipe "
                        f"'{recipe.name}' (method {recipe.method}) does not") from None
    groups = getattr(registry.get(recipe.method).Options, "exclusive_options", ())
    knobs = {"size_ratio"}.union(*(g for g in groups if "size_ratio" in g))
    for assignment in overrides:
        key = assignment.partition("=")[0].strip().removeprefix("options.")
        if key in knobs:
            raise UserError(f"--target-size sets the size: drop --set {assignment.strip()} (size_ratio sizes the "
                            "targets alone, --target-size the whole checkpoint)")


def load_compressed(path, *, dtype=None, device=None, fuse_siblings=False):
    from compressor.io.checkpoint import load_compressed as _load

    return _load(path, dtype=dtype, device=device, fuse_siblings=fuse_siblings)

