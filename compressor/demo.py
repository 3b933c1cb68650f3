"""`lrc demo`: the main job on the embedded default — the shipped demo model, the bundled text, no network.

Compresses models/lrc-demo-llama with svd-20, svd-llm-20, rtn-4bit and eora-4bit and prints a table. The
calibration statistics are collected once, on the dense model, and reused by all four recipes: the demo runs
every recipe with `sequential.inputs: dense`, where each layer's statistics do not depend on the recipe.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compressor import api
from compressor.io.checkpoint import checkpoint_bytes
from compressor.recipe import load_recipe
from compressor.errors import UserError
from compressor.report.summary import build_report, count_parameters, render_markdown, state_bytes
from compressor.resources import demo_model_dir
from compressor.pipeline.targets import find_decoder_layers
from compressor.pipeline.workflow import default_eval_seqlen, layer_progress

DEMO_RECIPES = ("svd-20", "svd-llm-20", "rtn-4bit", "eora-4bit")


def run_demo(output: str | None = None, device: str = "cpu", console: Console | None = None,
             recipes=DEMO_RECIPES, nsamples: int | None = None) -> list[dict]:
    console = console or Console()
    t_all = time.perf_counter()
    if not (demo_model_dir() / "model.safetensors").is_file():
        raise UserError(f"shipped demo model missing at {demo_model_dir()}: run scripts/train_demo_model.py")
    source = str(demo_model_dir())
    loaded = api.load_model(source, device=device)
    dense, tok = loaded.model, loaded.tokenizer
    seqlen = default_eval_seqlen(dense, None)
    console.print(f"[bold]lrc demo[/] — {source} ({sum(p.numel() for p in dense.parameters()):,} parameters), "
                  f"bundled calibration/eval text, device {device}")
    extra = ["sequential.inputs=dense"] + ([f"calibration.nsamples={nsamples}"] if nsamples else [])
    recipe_objs = [load_recipe(name, extra) for name in recipes]
    base_bytes = checkpoint_bytes(source)
    base_params = count_parameters(dense)

    t0 = time.perf_counter()
    ppl_dense = api.evaluate(dense, tok, seqlen=seqlen, device=device)
    batches, calib_info = api.calibration_data(tok, recipe_objs[0])
    n_layers = len(find_decoder_layers(dense)[1])
    with layer_progress("calibration statistics (once for all recipes)", n_layers) as advance:
        stats = api.collect_statistics(dense, batches, recipe_objs, device=device, progress=advance)
    shared_seconds = time.perf_counter() - t0

    table = Table(title=f"lrc demo — PPL on the bundled test split ({ppl_dense.windows} windows × {seqlen} tokens)")
    # param/size ratio: the targeted linears' parameters kept and stored bytes over their dense bytes (report.json)
    for col in ("recipe", "parameters", "param ratio", "size ratio", "size on disk", "PPL before → after",
                "wall time"):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    table.add_row("dense (shipped)", f"{base_params:,}", "1.000", "1.000", f"{base_bytes / 1e6:.2f} MB",
                  f"{ppl_dense.ppl:.3f}",
                  f"{shared_seconds:.1f}s (eval + shared statistics)")
    rows = []
    out_root = Path(output) if output else Path(tempfile.mkdtemp(prefix="lrc-demo-"))
    for recipe in recipe_objs:
        t0 = time.perf_counter()
        model = copy.deepcopy(dense)
        with layer_progress(f"{recipe.name}: layers", n_layers) as advance:
            result = api.compress(model, recipe, statistics=stats, storage_dtype=loaded.storage_dtype,
                                  progress=advance)
        result.calibration = calib_info
        ppl = api.evaluate(model, tok, seqlen=seqlen, device=device)
        params = count_parameters(model)
        report = build_report(result, model_source=source, params_before=base_params, params_after=params,
                              bytes_before=base_bytes, bytes_after=state_bytes(model, loaded.storage_dtype), ppl_before=ppl_dense, ppl_after=ppl,
                              device=device)
        target = out_root / recipe.name
        result.save(target, tokenizer=tok, report=report, report_md=render_markdown(report), overwrite=True)
        size = checkpoint_bytes(target)
        seconds = time.perf_counter() - t0
        totals = report["totals"]
        table.add_row(recipe.name, f"{params:,}", f"{totals['param_ratio']:.3f}", f"{totals['size_ratio']:.3f}",
                      f"{size / 1e6:.2f} MB", f"{ppl_dense.ppl:.3f} → {ppl.ppl:.3f}", f"{seconds:.1f}s")
        rows.append({"recipe": recipe.name, "params": params, "bytes": size, "ppl_before": ppl_dense.ppl,
                     "ppl_after": ppl.ppl, "seconds": seconds, "path": str(target),
                     "param_ratio": totals["param_ratio"], "size_ratio": totals["size_ratio"]})
    table.caption = (f"total {time.perf_counter() - t_all:.1f}s; outputs in {out_root}/; calibration "
                     f"{calib_info['nsamples']}×{calib_info['seqlen']} tokens from {calib_info['source']}")
    console.print(table)
    return rows
