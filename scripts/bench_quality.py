"""Quality benchmark: method × budget → perplexity, printed as a table and written as JSON.

    .venv/bin/python scripts/bench_quality.py                       # the shipped demo model (a few minutes)
    .venv/bin/python scripts/bench_quality.py --model .cache/smollm2-135m-instruct --max-windows 40
    .venv/bin/python scripts/bench_quality.py --update-readme       # also write docs/benchmarks.md's results block
    .venv/bin/python scripts/bench_quality.py --model .cache/smollm2-135m-instruct --max-windows 40 --rows lowrank \
        --json bench-results/quality-smollm2.json                  # issue 12: lowrank vs svd-llm, each option alone
    .venv/bin/python scripts/bench_quality.py --model .cache/smollm2-135m-instruct-bf16 --max-windows 40 --rows bytes \
        --json bench-results/quality-bytes.json                    # issue 14: 8-bit vs 16-bit factors, equal bytes

Every row compresses a fresh copy of the dense model with a built-in recipe (plus overrides) and scores it on
the bundled test split with the papers' protocol. Budgets are "% of targeted parameters removed". All rows use
the same calibration windows (nsamples × seqlen from the bundled train split, seed 0). Rows with an `svd-llm`
row of the same budget also print their perplexity and compression time relative to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from compressor import api
from compressor.recipe import load_recipe
from compressor.report.summary import count_parameters
from compressor.resources import demo_model_dir

# scripts/ is sys.path[0] when this file runs as a script: the table's formatting lives in update_readme.py only.
from update_readme import result_cells, setup_line, update_results

# (label, recipe, overrides): removed budgets 20% and 40% for every low-rank method, plus the quantized rows.
ROWS = [
    (f"{method} {cut}%", recipe, [f"param_ratio={1 - cut / 100:g}"] + extra)
    for cut in (20, 40)
    for method, recipe, extra in (
        ("svd", "svd-20", []),
        ("fwsvd", "fwsvd-20", []),
        ("asvd", "asvd-20", []),
        ("svd-llm", "svd-llm-20", []),
        ("svd-llm+global", "svd-llm-20", ["allocation=global"]),
        ("svd-llm+beta0.25+ridge0.01", "svd-llm-20", ["beta=0.25", "ridge=0.01"]),
        ("lowrank", "lowrank-20", []),
    )
] + [
    ("lowrank-sparse 50%", "lowrank-sparse-50", []),
    ("svd-llm 50%", "svd-llm-20", ["param_ratio=0.5"]),
    ("rtn 4-bit", "rtn-4bit", []),
    ("eora(rtn) 4-bit r64", "eora-4bit", []),
    ("eora(gptq) 4-bit r64", "eora-gptq-4bit", []),
]


# Issue 12's table: plain svd-llm and lrc's best low-rank recipes at 20% and 40% removed, and at 40% each option
# of the best recipe alone on top of plain svd-llm (its on/off effect).
OPTIONS = [
    ("skip-sink", ["calibration.skip_first=1"]),
    ("group-sequential", ["sequential.granularity=group"]),
    ("beta0.25+ridge0.01", ["beta=0.25", "ridge=0.01"]),
    ("global-loss", ["allocation=global", "allocation_options.weight=loss"]),
    ("refine", ["refine.epochs=4", "refine.lr=0.01", "refine.relative_lr=true", "refine.batch_size=2",
                "refine.target=dense"]),
]
LOWRANK_ROWS = (
    [("svd-llm 20%", "svd-llm-20", []), ("lowrank 20%", "lowrank-20", []), ("svd-llm 40%", "svd-llm-40", [])]
    + [(f"svd-llm+{name} 40%", "svd-llm-40", overrides) for name, overrides in OPTIONS]
    + [("lowrank 40%", "lowrank-40", [])]
)
# Issue 14's table: at equal stored bytes (size_ratio 0.8 and 0.6 of the targets' dense bytes), svd-llm with
# factors in the checkpoint's dtype against 8-bit factors at about twice the rank. "N%" here is bytes removed.
BYTES_ROWS = [
    row
    for cut in (20, 40)
    for row in ((f"svd-llm {cut}%", "svd-llm-20", [f"size_ratio={1 - cut / 100:g}"]),
                (f"svd-llm+int8 {cut}%", f"svd-llm-int8-{cut}", []))
]
SUITES = {"all": ROWS, "lowrank": LOWRANK_ROWS, "bytes": BYTES_ROWS}


def relative_to_svd_llm(rows: list[dict]) -> None:
    """Each row's perplexity and seconds over the plain `svd-llm` row of the same budget ("… 40%"), if any."""
    base = {r["label"].split()[-1]: r for r in rows if r["label"].startswith("svd-llm ")}
    for row in rows:
        ref = base.get(row["label"].split()[-1])
        if ref is not None and row is not ref and "seconds" in row:
            row["ppl_vs_svd_llm"] = row["ppl"] / ref["ppl"]
            row["time_vs_svd_llm"] = row["seconds"] / ref["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_model_dir()))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--only", nargs="*", help="labels (substrings) of the rows to run")
    parser.add_argument("--rows", choices=sorted(SUITES), default="all",
                        help="all: every method at 20%% and 40%%; lowrank: svd-llm vs lowrank-20/40 and each option; "
                             "bytes: svd-llm with 16- vs 8-bit factors at equal stored bytes")
    parser.add_argument("--json", type=Path, default=Path("bench-results/quality.json"))
    parser.add_argument("--update-readme", action="store_true",
                        help="write docs/benchmarks.md's results block from this run (scripts/update_readme.py)")
    args = parser.parse_args()
    if args.update_readme and (args.only or args.rows != "all"):
        parser.error("--update-readme writes the results block's whole table: run every row "
                     "(drop --only and --rows)")

    console = Console(width=130)  # wide enough for every label: the printed table is pasted into docs/benchmarks.md
    loaded = api.load_model(args.model)
    calib = [f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}"]
    evaluate = lambda m: api.evaluate(m, loaded.tokenizer, seqlen=args.eval_seqlen,  # noqa: E731
                                      max_windows=args.max_windows)
    dense = evaluate(loaded.model)
    rows = [{"label": "dense", "ppl": dense.ppl}]
    for label, recipe, overrides in SUITES[args.rows]:
        if args.only and not any(o in label for o in args.only):
            continue
        start = time.perf_counter()
        model = copy.deepcopy(loaded.model)
        result = api.compress(model, load_recipe(recipe, calib + overrides), tokenizer=loaded.tokenizer,
                              storage_dtype=loaded.storage_dtype)
        ppl = evaluate(model).ppl
        kept = sum(m.params_after for m in result.modules) / sum(m.params_before for m in result.modules)
        size = sum(m.bytes_after for m in result.modules) / sum(m.bytes_before for m in result.modules)
        rows.append({"label": label, "recipe": recipe, "overrides": overrides, "ppl": ppl, "kept": kept,
                     "size": size, "seconds": time.perf_counter() - start})
        console.print(f"{label}: PPL {ppl:.3f}, {rows[-1]['seconds']:.1f} s")
        del model
    relative_to_svd_llm(rows)
    data = {
        "model": args.model, "date": str(date.today()),
        "eval": {"data": dense.data, "windows": dense.windows, "seqlen": dense.seqlen},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "source": "bundled train split"},
        "platform": {"machine": platform.processor() or platform.machine(), "torch": torch.__version__},
        "rows": rows,
    }

    console.print(results_table(data))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1))
    if args.update_readme:
        written = update_results(data)
        console.print(f"wrote the results block of {written}")


def results_table(data: dict) -> Table:
    rows, dense_ppl = data["rows"], data["rows"][0]["ppl"]
    table = Table(title="perplexity by method and budget", caption=setup_line(data))
    for col in ("method / budget", "target params kept", "PPL", "Δ vs dense", "PPL / svd-llm", "seconds",
                "time / svd-llm", "target bytes kept"):
        table.add_column(col, justify="left" if col.startswith("method") else "right")
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if "seconds" in row else ""
        ratio = lambda key: f"{row[key]:.3f}" if key in row else ""  # noqa: E731
        size = f"{row['size']:.1%}" if "size" in row else ("100%" if row["label"] == "dense" else "")
        table.add_row(row["label"], *result_cells(row, dense_ppl), ratio("ppl_vs_svd_llm"), seconds,
                      ratio("time_vs_svd_llm"), size)
    return table


if __name__ == "__main__":
    main()
