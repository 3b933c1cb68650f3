"""One `lrc compress`, read top to bottom: load → targets → statistics / plan → layers → write → report, in memory
or with `--low-memory` (decoder layers read from the checkpoint one at a time and written as they finish).

The edge (`compressor.api.compress_checkpoint`, which the CLI calls) checks every input and parses the recipe, its
`--set` overrides and `--target-size` once, into a `CompressJob`; `run(job)` does the work and never reads a
recipe by name again. Targets are selected once, here, and handed to every later step.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from compressor.io.checkpoint import publish
from compressor.io.load import load_model
from compressor.pipeline import distributed
from compressor.pipeline.distributed_journal import sharded_journal
from compressor.pipeline.compression import compress_model
from compressor.pipeline.journal import Journal, fault, run_identity
from compressor.pipeline.result import calibration_data
from compressor.pipeline.streaming import LazyLayers, finish_streamed, load_skeleton
from compressor.pipeline.targets import find_decoder_layers, select_targets
from compressor.pipeline.workflow import (check_written, default_eval_seqlen, evaluate_in_memory, final_write,
                                          layer_progress, merged_timings, report_plots, size_ratio_for_bytes)
from compressor.recipe import Recipe
from compressor.report.summary import build_report, count_parameters, render_markdown, state_bytes


@dataclass(frozen=True)
class CompressJob:
    """Everything one run needs, validated at the edge."""

    source: str  # local directory or hub id
    recipe: Recipe  # overrides applied
    out: Path
    calib_texts: tuple  # (texts, description): a `load_texts` result
    overrides: tuple[str, ...] = ()  # applied again after a target size's size_ratio (none may size the targets)
    # --target-size as parse_target_size gives it, ("fraction", 0.35) or ("bytes", n), and as the user wrote it:
    # the whole checkpoint's weights in at most that (a fraction of the dense checkpoint's bytes)
    target_size: tuple | None = None
    target_size_text: str | None = None
    evaluate: bool = False
    eval_data: str | None = None
    eval_seqlen: int | None = None
    eval_max_windows: int | None = None
    device: str = "cpu"
    dtype: str = "auto"
    overwrite: bool = False
    trust_remote_code: bool = False
    show_progress: bool = True
    with_plots: bool = True
    low_memory: bool = False
    resume: bool = False


def run(job: CompressJob) -> dict:
    """Compress `job.source` into `job.out`; returns the report (also written as report.json)."""
    timings: dict[str, float] = {}
    # 1. load: the whole model in CPU memory, or only what lies outside its decoder layers
    t0 = time.perf_counter()
    if job.low_memory:
        skeleton = load_skeleton(job.source, dtype=job.dtype, device=job.device,
                                 trust_remote_code=job.trust_remote_code)
        model, tok, storage = skeleton.model, skeleton.tokenizer, skeleton.storage_dtype
    else:
        loaded = load_model(job.source, dtype=job.dtype, device=job.device, trust_remote_code=job.trust_remote_code,
                            keep_on_cpu=True)
        model, tok, storage = loaded.model, loaded.tokenizer, loaded.storage_dtype
    timings["load"] = time.perf_counter() - t0

    # 2. targets, once (matching nothing fails here, before any work); a target size, in bytes or as a fraction of
    # the dense checkpoint's (each tensor counted once, as written), becomes the targets' size_ratio
    layer_targets = select_targets(model, job.recipe.targets, job.recipe.ignore)
    params_before, bytes_before = count_parameters(model), state_bytes(model, storage)
    recipe, target_bytes = job.recipe, None
    if job.target_size is not None:
        kind, value = job.target_size
        target_bytes = math.floor(value * bytes_before) if kind == "fraction" else value
        ratio = size_ratio_for_bytes(layer_targets, storage, target_bytes, bytes_before, job.target_size_text)
        recipe = recipe.with_overrides((f"size_ratio={ratio}", *job.overrides))

    # 3. perplexity before, calibration windows, the resume journal
    seqlen = default_eval_seqlen(model, job.eval_seqlen)
    ppl = {}
    if job.evaluate:
        t0 = time.perf_counter()
        ppl["before"] = evaluate_in_memory(model, tok, job.eval_data, seqlen, job.device, job.eval_max_windows,
                                           job.show_progress, "before")
        timings["eval_before"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches, calib_info = calibration_data(tok, recipe, loaded_texts=job.calib_texts)
    timings["calibration_data"] = time.perf_counter() - t0
    identity = run_identity(recipe, job.source, batches, device=job.device, dtype=job.dtype, low_memory=job.low_memory)
    n_layers = len(find_decoder_layers(model)[1])
    # (under torchrun rank 0 alone keeps it, the others take part: compressor/pipeline/distributed_journal.py)
    journal = sharded_journal(lambda: Journal.open(
        job.out, identity, resume=job.resume, storage_dtype=storage, layers=n_layers),
        batches.shape[0])

    def report_for(result):
        """The report and its files, from the compressed model (one builder for both paths)."""
        report = build_report(
            result, model_source=job.source, params_before=params_before, params_after=count_parameters(model),
            bytes_before=bytes_before, bytes_after=state_bytes(model, storage), ppl_before=ppl.get("before"),
            ppl_after=ppl.get("after"), timings=merged_timings(timings, result.timings), device=job.device,
        )
        if result.resumed_from:
            report["resumed_from_layer"] = result.resumed_from  # the layers before it come from the interrupted run
        if job.low_memory:
            report["low_memory"] = True
        plots = report_plots(report) if job.with_plots else {}
        return report, lambda r: final_write(render_markdown(r, plots=list(plots))), plots

    with journal.kept_on_failure():
        fault("before-layers")
        # 4. statistics / plan → layers: the layers of a --low-memory run are written to the journal's folder as
        # they finish, which becomes the output
        layer_io = None
        if job.low_memory:
            compute = next(model.get_input_embeddings().parameters()).dtype
            layer_io = LazyLayers(model, skeleton.files, skeleton.layers_path, skeleton.n_layers, compute, storage,
                                  journal.folder)
        with layer_progress(f"{recipe.name}: layers", n_layers, job.show_progress) as advance:
            result = compress_model(model, recipe, layer_targets=layer_targets, batches=batches, device=job.device,
                                    storage_dtype=storage, progress=advance, layer_io=layer_io, journal=journal)
        result.calibration = calib_info
        if job.evaluate:  # (refused with --low-memory at the edge: it needs the whole model)
            t0 = time.perf_counter()
            ppl["after"] = evaluate_in_memory(model, tok, job.eval_data, seqlen, job.device, job.eval_max_windows,
                                              job.show_progress, "after")
            timings["eval_after"] = time.perf_counter() - t0
        if not distributed.is_writer():  # under torchrun rank 0 alone writes the output and the report
            return {}

        # 5. write and 6. report (the report records the save time, so it is rendered while the output is written),
        # beside the output; published once the bytes written are checked against the report and the size asked
        if layer_io is None:
            report, markdown, plots = report_for(result)
            written = journal.folder / "output"
            for stale in (written, *journal.folder.glob(".output.tmp-*")):  # an interrupted final write's (--resume)
                shutil.rmtree(stale, ignore_errors=True)
            result.save(written, tokenizer=tok, report=report, report_md=markdown, extra_files=plots)
        else:
            result.timings["load"] = layer_io.seconds["load"]
            report = finish_streamed(model, result, layer_io, journal.folder, tok, storage, report_for)
            written = journal.folder
        journal.close_out()  # (its activations are safetensors too: gone before the bytes written are counted)
        try:
            check_written(written, report, target_bytes, job.target_size_text)
        except Exception as exc:  # not resumable: the same run would write the same bytes
            journal.discard()
            exc.lrc_journal = True
            raise
        publish(written, job.out, job.overwrite)
    journal.discard()
    return report
