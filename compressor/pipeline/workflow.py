"""End-to-end jobs behind the CLI, usable from Python: compress a checkpoint to a directory, evaluate one.

    from compressor.pipeline.workflow import compress_checkpoint
    report = compress_checkpoint("Qwen/Qwen2.5-0.5B", "svd-llm-20", "out/", evaluate_ppl=True)

Every user error is detected before the model is loaded where possible (output directory, recipe, calibration
text), so bad input fails in a second with one line and nothing on disk.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from compressor import api
from compressor.data import load_texts
from compressor.errors import UserError
from compressor.pipeline.journal import Journal, fault, refuse_leftover, run_identity
from compressor.io.preflight import check_model_source, check_output
from compressor.recipe import load_recipe
from compressor.report.summary import build_report, count_parameters, render_markdown, state_bytes
from compressor.pipeline.targets import find_decoder_layers, select_targets

console = Console(stderr=True)


class _Rate(ProgressColumn):
    """"3.2 windows/s" (rich's own speed columns speak bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(_rate(speed, self.unit) if speed else f"? {self.unit}/s", style="progress.data.speed")


def _rate(per_second: float, unit: str) -> str:
    """"2.31 windows/s", or "14.2 s/layer" when steps are slow."""
    return f"{per_second:.2f} {unit}/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{unit.rstrip('s')}"


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True, unit: str = "layers"):
    """Progress with rate and ETA; yields a callback(done=None, total=None): `done` of `total` finished (None: one
    more; `total` may arrive with the first call).

    On a terminal: a rich bar. Elsewhere (CI, pipes, `nohup ... > log`): one plain flushed line per step with the
    elapsed time and an estimate of the time left, since a bar off a terminal prints nothing until the end."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        start, state = time.perf_counter(), {"done": 0, "total": total}

        def line(done=None, total=None):
            state["done"] = state["done"] + 1 if done is None else done
            state["total"] = total or state["total"]
            n, of, elapsed = state["done"], state["total"], time.perf_counter() - start
            eta = f", eta {_duration(elapsed / n * (of - n))}" if of and 0 < n < of else ""
            rate = _rate(n / elapsed, unit) if elapsed > 0 and n > 0 else ""
            print(f"{description} {n}/{of or '?'}, {_duration(elapsed)} elapsed, {rate}{eta}", file=sys.stderr,
                  flush=True)

        yield line
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def bar(done=None, total=None):
            if total is not None:
                progress.update(task, total=total)
            progress.advance(task) if done is None else progress.update(task, completed=done)

        yield bar


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@contextmanager
def layer_progress(description: str, total: int, enabled: bool = True):
    """Progress over decoder layers; yields a callback(index) saying layer `index` is done."""
    with progress_bar(description, total, enabled, unit="layers") as step:
        yield None if step is None else (lambda index: step(index + 1))


def eval_progress(label: str, enabled: bool = True):
    """Progress over evaluation windows (windows/s, ETA); yields a `progress(done, total)` for api.evaluate."""
    return progress_bar(f"perplexity ({label}): windows" if label else "perplexity: windows", None, enabled,
                        unit="windows")


def _eval(model, tokenizer, data, seqlen, device, max_windows, show, label):
    """Whole-model evaluation on `device`; the model goes back to CPU memory afterwards."""
    with eval_progress(label, show) as progress:
        model.to(device)
        try:
            return api.evaluate(model, tokenizer, data, seqlen=seqlen, device=device, max_windows=max_windows,
                                progress=progress)
        finally:
            model.to("cpu")


def report_plots(report: dict) -> dict[str, bytes]:
    """{"plots/NAME.png": PNG bytes} for the report's plots, so they are written atomically with the output."""
    import tempfile

    from compressor.report.plots import write_plots

    with tempfile.TemporaryDirectory() as folder:
        return {f"plots/{p.name}": p.read_bytes() for p in write_plots(report, Path(folder))}


def default_eval_seqlen(model, requested: int | None) -> int:
    """The papers use 2048; never exceed the context the model was trained for."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return requested if requested is not None else min(2048, limit)


def compress_checkpoint(
    model_name: str,
    recipe_name: str,
    out: str | Path,
    *,
    overrides: tuple[str, ...] = (),
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
    target_bytes: int | None = None,
) -> dict:
    """`resume`: finish the run an interruption left in `.OUT.partial/` (compressor/pipeline/journal.py); without it such a
    leftover is refused before any work. `target_bytes`: the whole checkpoint's weights in at most this many bytes
    (sets the recipe's size_ratio for the targeted linears: what the rest of the checkpoint leaves them)."""
    out = Path(out)
    source_bytes = check_model_source(model_name)  # a typo'd path: one line now, not hub retries
    check_output(out, overwrite=overwrite, expected_bytes=source_bytes, source=model_name)  # not after the run
    refuse_leftover(out, resume)
    recipe = load_recipe(recipe_name, overrides)
    calib_texts = load_texts(calib, split_default="train")  # fail fast on a missing/empty calibration file
    if evaluate_ppl:
        if low_memory:
            raise UserError("--eval needs the whole model in memory; with --low-memory, run `lrc eval OUT` on a "
                            "machine that holds it")
        load_texts(eval_data, split_default="test")
    timings = {}
    t0 = time.perf_counter()
    if low_memory:  # decoder layers stay on disk until the runner needs them (compressor/pipeline/streaming.py)
        from compressor.pipeline.streaming import compress_streaming, load_skeleton

        skeleton = load_skeleton(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        model, tok, storage = skeleton.model, skeleton.tokenizer, skeleton.storage_dtype
    else:
        loaded = api.load_model(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                keep_on_cpu=True)
        model, tok, storage = loaded.model, loaded.tokenizer, loaded.storage_dtype
    timings["load"] = time.perf_counter() - t0
    layer_targets = select_targets(model, recipe.targets, recipe.ignore)  # matching nothing fails before any work
    params_before, bytes_before = count_parameters(model), state_bytes(model, storage)
    if target_bytes is not None:
        ratio = size_ratio_for_bytes(layer_targets, storage, target_bytes, bytes_before)
        recipe = load_recipe(recipe_name, (f"size_ratio={ratio}", *overrides))
    seqlen = default_eval_seqlen(model, eval_seqlen)
    ppl = {}
    if evaluate_ppl:
        t0 = time.perf_counter()
        ppl["before"] = _eval(model, tok, eval_data, seqlen, device, eval_max_windows, show_progress, "before")
        timings["eval_before"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches, calib_info = api.calibration_data(tok, recipe, loaded_texts=calib_texts)
    timings["calibration_data"] = time.perf_counter() - t0
    journal = Journal.open(out, run_identity(recipe, model_name, batches, device=device, dtype=dtype,
                                             low_memory=low_memory), resume=resume)

    def report_for(result, model):
        """The report and its files, from the compressed model (one builder for both paths)."""
        report = build_report(
            result, model_source=model_name, params_before=params_before, params_after=count_parameters(model),
            bytes_before=bytes_before, bytes_after=state_bytes(model, storage), ppl_before=ppl.get("before"),
            ppl_after=ppl.get("after"), timings=_merged(timings, result.timings), device=device,
        )
        if result.resumed_from:
            report["resumed_from_layer"] = result.resumed_from  # the layers before it come from the interrupted run
        if low_memory:
            report["low_memory"] = True
        plots = report_plots(report) if with_plots else {}
        return report, lambda r: _final_write(render_markdown(r, plots=list(plots))), plots

    n_layers = len(find_decoder_layers(model)[1])
    with journal.kept_on_failure():
        fault("before-layers")
        if low_memory:
            with layer_progress(f"{recipe.name}: layers", n_layers, show_progress) as advance:
                _, path = compress_streaming(model_name, recipe, out, batches=batches, device=device, dtype=dtype,
                                             overwrite=overwrite, progress=advance, calibration_info=calib_info,
                                             report_fn=lambda result, model, *_: report_for(result, model),
                                             skeleton=skeleton, journal=journal)
            return json.loads((path / "report.json").read_text(encoding="utf-8"))
        with layer_progress(f"{recipe.name}: layers", n_layers, show_progress) as advance:
            result = api.compress(model, recipe, batches=batches, device=device, storage_dtype=storage,
                                  progress=advance, journal=journal)
        result.calibration = calib_info
        if evaluate_ppl:
            t0 = time.perf_counter()
            ppl["after"] = _eval(model, tok, eval_data, seqlen, device, eval_max_windows, show_progress, "after")
            timings["eval_after"] = time.perf_counter() - t0
        report, markdown, plots = report_for(result, model)
        result.save(out, tokenizer=tok, report=report, report_md=markdown, overwrite=overwrite, extra_files=plots)
    journal.discard()
    return report


SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
              "gib": 2**30, "tib": 2**40}


def parse_target_size(text: str) -> tuple[str, float | int]:
    """'0.4' -> ("ratio", 0.4); '4.5GB' / '800 MiB' / '123456789' (bytes) -> ("bytes", n)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in SIZE_UNITS and match.group(2) != "":
        raise UserError(f"--target-size {text!r}: give a fraction such as 0.4 or a size such as 4.5GB / 800MiB")
    number, unit = float(match.group(1)), match.group(2)
    if not unit and 0 < number < 1:
        return "ratio", number
    if not unit and number.is_integer() and number >= 1:
        return "bytes", int(number)
    if unit and number > 0:
        return "bytes", int(number * SIZE_UNITS[unit])
    raise UserError(f"--target-size {text!r}: a fraction must lie strictly between 0 and 1; a size needs a unit "
                    "(4.5GB, 800MiB) or a whole number of bytes")


def size_ratio_for_bytes(layer_targets, storage, target_bytes: int, bytes_before: int) -> float:
    """The targets' size_ratio that makes the whole checkpoint's weights at most `target_bytes`: everything lrc does
    not compress (embeddings, norms, lm_head, biases) keeps its bytes; the targets' weights share the rest."""
    element = torch.empty((), dtype=storage).element_size()
    targets = sum(t.weight.numel() for layer in layer_targets for t in layer.values()) * element
    fixed = bytes_before - targets
    ratio = math.floor((target_bytes - fixed) / targets * 1e6) / 1e6  # rounded down: never over the size asked
    if target_bytes >= bytes_before:
        raise UserError(f"--target-size {target_bytes:,} bytes is not below the dense checkpoint's "
                        f"{bytes_before:,} bytes: nothing to compress")
    if ratio <= 0:
        raise UserError(f"--target-size {target_bytes:,} bytes: the weights lrc does not compress (embeddings, "
                        f"norms, lm_head) already take {fixed:,} bytes")
    return ratio


def _merged(workflow: dict, compression: dict) -> dict:
    """One timings table: what the workflow measured around compress() and what compress() measured inside (both
    may count loading: a --low-memory run loads each layer during the compression)."""
    merged = {**workflow, **compression}
    if "load" in workflow and "load" in compression:
        merged["load"] = workflow["load"] + compression["load"]
    return merged


def _final_write(text):
    """Called while the output is written (weights on disk, not yet renamed into place): a fault point."""
    fault("final-write")
    return text


def evaluate_checkpoint(model_name: str, *, data=None, seqlen=None, device="cpu", dtype="auto", batch_size=4,
                        max_windows=None, trust_remote_code=False, show_progress=True):
    check_model_source(model_name)
    if data is not None:
        load_texts(data, split_default="test")
    loaded = api.load_model(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    seqlen = default_eval_seqlen(loaded.model, seqlen)
    with eval_progress("", show_progress) as progress:
        return api.evaluate(loaded.model, loaded.tokenizer, data, seqlen=seqlen, batch_size=batch_size,
                            device=device, max_windows=max_windows, progress=progress)
