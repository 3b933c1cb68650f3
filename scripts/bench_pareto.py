"""Size–quality plot: perplexity against stored bytes (size_ratio of the targeted linears) for several encodings.

    .venv/bin/python scripts/bench_pareto.py --model .cache/smollm2-135m-instruct-bf16 --max-windows 40
    .venv/bin/python scripts/bench_pareto.py --from-json bench-results/quality-bytes.json bench-results/pareto.json

Every point compresses a fresh copy of the dense model with a built-in recipe (plus overrides), scores it on the
bundled test split and records `size` (bytes after / before of the targets, from the tensors the checkpoint would
hold — the report's `size_ratio`) and `kept` (parameters after / before). Families share a line and a marker;
the x-axis is bytes, so methods are compared at equal size, not equal parameter count. Writes
bench-results/pareto.json and bench-results/pareto.png. `--from-json` re-plots (and merges) rows from this script
or from `bench_quality.py` (rows with a `size`, labelled "<family> <budget>"); `--only` runs some families.
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

# (family, recipe, overrides): svd-llm with 16-bit vs 8-bit factors over a range of sizes, and the other encodings.
POINTS = (
    [("svd-llm", "svd-llm-20", [f"size_ratio={q}"]) for q in (0.8, 0.6, 0.4)]
    + [("svd-llm+int8", "svd-llm-int8-20", [f"size_ratio={q}"]) for q in (0.8, 0.6, 0.4, 0.25)]
    + [("lowrank-sparse", "lowrank-sparse-50", [f"size_ratio={q}"]) for q in (0.5,)]
    + [("rtn", "rtn-4bit", [f"bits={b}"]) for b in (8, 4)]
    + [("gptq", "rtn-4bit", ["method=gptq", f"bits={b}"]) for b in (8, 4, 3)]
    + [("gptq+eora", "eora-gptq-4bit", [f"bits={b}", f"rank={r}"]) for b, r in ((3, 32), (4, 16), (4, 48))]
    # the auto recipe behind `--target-size` (one byte budget, allocation: global), sized by the targets' bytes
    # (size_ratio) like every other row here; `--target-size X` itself bounds the whole checkpoint
    + [("auto", "auto", [f"size_ratio={q}"]) for q in (0.6, 0.4, 0.3, 0.25)]
)


def measure(model, tokenizer, recipe, overrides, calib, evaluate, storage_dtype) -> dict:
    from compressor import api
    from compressor.recipe import load_recipe

    start = time.perf_counter()
    model = copy.deepcopy(model)
    result = api.compress(model, load_recipe(recipe, calib + overrides), tokenizer=tokenizer,
                          storage_dtype=storage_dtype)
    ppl = evaluate(model).ppl
    before = sum(m.bytes_before for m in result.modules)
    return {"recipe": recipe, "overrides": overrides, "ppl": ppl,
            "kept": sum(m.params_after for m in result.modules) / sum(m.params_before for m in result.modules),
            "size": sum(m.bytes_after for m in result.modules) / before,
            "seconds": time.perf_counter() - start}


def plot(data: dict, path: Path) -> Path:
    """Left: every row, log perplexity. Right: the same rows zoomed on the near-dense band (up to 1.3× dense), where
    the encodings worth using differ by fractions of a point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    full, zoom = fig.subplots(1, 2)
    families: dict[str, list[dict]] = {}
    for row in data["rows"]:
        if "size" in row:
            families.setdefault(row.get("family") or row["label"].rsplit(" ", 1)[0], []).append(row)
    markers = "osD^vP*X"
    dense = next((r["ppl"] for r in data["rows"] if r["label"] == "dense"), None)
    for ax in (full, zoom):
        for i, (family, rows) in enumerate(sorted(families.items())):
            rows = sorted(rows, key=lambda r: r["size"])
            ax.plot([r["size"] for r in rows], [r["ppl"] for r in rows], marker=markers[i % len(markers)],
                    label=family)
        if dense is not None:
            ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("stored bytes of the targeted linears / dense (size_ratio)")
        ax.grid(True, alpha=0.3)
    full.set_ylabel("perplexity (log)")
    full.set_yscale("log")
    full.set_title(f"{Path(data['model']).name}: perplexity vs size")
    if dense is not None:
        zoom.set_ylim(dense * 0.98, dense * 1.3)
        zoom.set_title("zoom: within 30 % of dense")
    zoom.set_ylabel("perplexity")
    zoom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--only", nargs="*", help="points to run: a family (svd-llm+int8) or a substring of "
                                                   "'<family> <overrides>' (e.g. 'int8 size_ratio=0.4')")
    parser.add_argument("--from-json", type=Path, nargs="+", help="plot (and merge) these rows instead of measuring")
    parser.add_argument("--json", type=Path, default=Path("bench-results/pareto.json"))
    parser.add_argument("--png", type=Path, default=Path("bench-results/pareto.png"))
    args = parser.parse_args()

    if args.from_json:
        datas = [json.loads(p.read_text()) for p in args.from_json]
        rows = [r for i, d in enumerate(datas) for r in d["rows"] if i == 0 or r["label"] != "dense"]
        print(plot({**datas[0], "rows": rows}, args.png))
        return
    from compressor import api
    from compressor.resources import demo_model_dir

    model = args.model or str(demo_model_dir())
    loaded = api.load_model(model)
    calib = [f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}"]
    evaluate = lambda m: api.evaluate(m, loaded.tokenizer, seqlen=args.eval_seqlen,  # noqa: E731
                                      max_windows=args.max_windows)
    dense = evaluate(loaded.model)
    rows = [{"label": "dense", "ppl": dense.ppl, "size": 1.0, "kept": 1.0, "family": "dense"}]
    for family, recipe, overrides in POINTS:
        if args.only and not any(o == family or o in f"{family} {' '.join(overrides)}" for o in args.only):
            continue
        row = measure(loaded.model, loaded.tokenizer, recipe, overrides, calib, evaluate, loaded.storage_dtype)
        row.update(family=family, label=f"{family} {row['size']:.2f}")
        rows.append(row)
        print(f"{row['label']}: size {row['size']:.3f}, params {row['kept']:.3f}, PPL {row['ppl']:.3f}, "
              f"{row['seconds']:.1f} s", flush=True)
    data = {"model": model, "date": str(date.today()),
            "eval": {"data": dense.data, "windows": dense.windows, "seqlen": dense.seqlen},
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "source": "bundled train split"},
            "platform": {"machine": platform.processor() or platform.machine(), "torch": torch.__version__},
            "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1))
    print(plot(data, args.png))


if __name__ == "__main__":
    main()
