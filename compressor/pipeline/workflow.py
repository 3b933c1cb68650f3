"""What a run shows and measures around its steps (compressor/pipeline/run.py): progress bars with rate and ETA,
perplexity of the model in memory, the report's plots, the size_ratio a byte budget leaves the targets, the check
of the bytes written against the report and the size asked; and
`evaluate_checkpoint`, the job behind `lrc eval`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from compressor.data import load_texts
from compressor.errors import UserError
from compressor.io.checkpoint import tensor_data_bytes
from compressor.io.load import load_model
from compressor.io.preflight import check_model_source
from compressor.pipeline.journal import fault
from compressor.report.perplexity import evaluate

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
    """Progress over evaluation windows (windows/s, ETA); yields a `progress(done, total)` for evaluate()."""
    return progress_bar(f"perplexity ({label}): windows" if label else "perplexity: windows", None, enabled,
                        unit="windows")


def evaluate_in_memory(model, tokenizer, data, seqlen, device, max_windows, show, label):
    """Whole-model evaluation on `device`; the model goes back to CPU memory afterwards."""
    with eval_progress(label, show) as progress:
        model.to(device)
        try:
            return evaluate(model, tokenizer, data, seqlen=seqlen, device=device, max_windows=max_windows,
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


def size_ratio_for_bytes(layer_targets, storage, target_bytes: int, bytes_before: int, asked: str) -> float:
    """The targets' size_ratio that makes the whole checkpoint's weights at most `target_bytes`: everything lrc does
    not compress (embeddings, norms, an untied lm_head, biases) keeps its bytes; the targets' weights share the rest.
    `asked`: the --target-size as the user wrote it, for the errors."""
    element = torch.empty((), dtype=storage).element_size()
    targets = sum(t.weight.numel() for layer in layer_targets for t in layer.values()) * element
    fixed = bytes_before - targets
    ratio = math.floor((target_bytes - fixed) / targets * 1e6) / 1e6  # rounded down: never over the size asked
    if target_bytes >= bytes_before:
        raise UserError(f"--target-size {asked} ({target_bytes:,} bytes) is not below the dense checkpoint's "
                        f"{bytes_before:,} bytes: nothing to compress")
    if ratio <= 0:
        raise UserError(f"--target-size {asked} ({target_bytes:,} bytes): the weights lrc does not compress "
                        f"(embeddings, norms, lm_head) already take {fixed:,} bytes")
    return ratio


def check_written(folder: Path, report: dict, target_bytes: int | None, asked: str | None) -> None:
    """After the write, before the output is published: the safetensors in `folder` hold exactly the weight bytes
    the report states (one truth: what is written), and no more than a --target-size asked for."""
    on_disk = tensor_data_bytes(folder)
    stated = report["totals"]["weight_bytes_after"]
    if on_disk != stated:
        raise RuntimeError(f"lrc bug: the report states {stated:,} weight bytes, the safetensors written hold "
                           f"{on_disk:,}; nothing was published")
    if target_bytes is not None and on_disk > target_bytes:
        dense = [m for m in report["modules"] if not m["compressed"]]
        why = (f" ({len(dense)} of {len(report['modules'])} targets kept dense, e.g. {dense[0]['name']}: "
               f"{dense[0]['note']})" if dense else "")
        raise UserError(f"--target-size {asked}: the weights written come to {on_disk:,} bytes, over the "
                        f"{target_bytes:,} asked{why}; nothing was published: ask for more, or use recipe auto")


def merged_timings(workflow: dict, compression: dict) -> dict:
    """One timings table: what the workflow measured around compress() and what compress() measured inside (both
    may count loading: a --low-memory run loads each layer during the compression)."""
    merged = {**workflow, **compression}
    if "load" in workflow and "load" in compression:
        merged["load"] = workflow["load"] + compression["load"]
    return merged


def final_write(text):
    """Called while the output is written (weights on disk, not yet renamed into place): a fault point."""
    fault("final-write")
    return text


def evaluate_checkpoint(model_name: str, *, data=None, seqlen=None, device="cpu", dtype="auto", batch_size=4,
                        max_windows=None, trust_remote_code=False, show_progress=True):
    check_model_source(model_name)
    if data is not None:
        load_texts(data, split_default="test")
    loaded = load_model(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    seqlen = default_eval_seqlen(loaded.model, seqlen)
    with eval_progress("", show_progress) as progress:
        return evaluate(loaded.model, loaded.tokenizer, data, seqlen=seqlen, batch_size=batch_size,
                            device=device, max_windows=max_windows, progress=progress)
