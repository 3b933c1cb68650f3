"""Block refinement of quantised encodings (issue 24): perplexity of quantised recipes without and with refinement.

    .venv/bin/python scripts/bench_refine_quant.py --threads 1                     # the shipped demo model
    .venv/bin/python scripts/bench_refine_quant.py --threads 1 --model .cache/smollm2-135m-instruct --max-windows 40 \
        --only "gptq 3-bit" --json bench-results/refine-quant-smollm2.json

Every row compresses a fresh copy of the dense model with a quantised recipe (GPTQ / RTN, group 128) on the same
calibration windows (nsamples × seqlen of the bundled train split, seed 0), once as is and once with block
refinement (`--refine`, default 4 epochs of 8 windows per step: codes, scales and zero points by SignSGD, an EoRA
residual by Adam), and scores both on the bundled test split with the papers' protocol. Timings are wall-clock on
whatever machine runs it (shared machines: say so next to the figures).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from compressor import api
from compressor.recipe import load_recipe
from compressor.resources import demo_model_dir

ROWS = [  # (label, recipe, overrides)
    ("rtn 4-bit", "rtn-4bit", []),
    ("rtn 3-bit", "rtn-4bit", ["bits=3"]),
    ("gptq 4-bit", "rtn-4bit", ["method=gptq", "act_order=true"]),
    ("gptq 3-bit", "rtn-4bit", ["method=gptq", "act_order=true", "bits=3"]),
    ("eora(gptq) 3-bit r16", "eora-gptq-4bit", ["bits=3", "rank=16"]),
]
REFINE = ["refine.epochs=4", "refine.batch_size=8"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_model_dir()))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--only", nargs="*", help="labels (substrings) of the rows to run")
    parser.add_argument("--refine", nargs="*", default=REFINE, help="the refined rows' recipe overrides")
    parser.add_argument("--json", type=Path, default=Path("bench-results/refine-quant.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = api.load_model(args.model)
    calib = [f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}"]
    evaluate = lambda m: api.evaluate(m, loaded.tokenizer, seqlen=args.eval_seqlen,  # noqa: E731
                                      max_windows=args.max_windows)
    dense = evaluate(loaded.model)
    print(f"dense: PPL {dense.ppl:.3f} ({dense.windows} windows × {dense.seqlen})", flush=True)
    rows = []
    for label, recipe, overrides in ROWS:
        if args.only and not any(o in label for o in args.only):
            continue
        row = {"label": label, "recipe": recipe, "overrides": overrides}
        for kind, extra in (("plain", []), ("refined", args.refine)):
            start = time.perf_counter()
            model = copy.deepcopy(loaded.model)
            result = api.compress(model, load_recipe(recipe, calib + overrides + extra), tokenizer=loaded.tokenizer,
                                  storage_dtype=loaded.storage_dtype)
            row[kind] = {"ppl": evaluate(model).ppl, "seconds": time.perf_counter() - start,
                         "layers": [r.to_dict() for r in result.refinement]}
            del model
        layers = row["refined"]["layers"]
        reverted = sum(r["reverted"] for r in layers)
        print(f"{label}: PPL {row['plain']['ppl']:.3f} -> {row['refined']['ppl']:.3f} refined "
              f"({row['plain']['seconds']:.0f} s / {row['refined']['seconds']:.0f} s; "
              f"{reverted}/{len(layers)} layers reverted)", flush=True)
        rows.append(row)
    data = {"model": args.model, "dense_ppl": dense.ppl, "eval": {"windows": dense.windows, "seqlen": dense.seqlen},
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen}, "refine": args.refine,
            "threads": torch.get_num_threads(), "rows": rows}
    print(f"\n(seconds: wall-clock with {torch.get_num_threads()} thread(s) on this machine, shared or not)")
    print(f"\n| recipe | dense | plain | refined | Δ plain | Δ refined | s plain | s refined |\n|---|---:|---:|---:|---:|"
          f"---:|---:|---:|")
    for row in rows:
        p, r = row["plain"], row["refined"]
        print(f"| {row['label']} | {dense.ppl:.3f} | {p['ppl']:.3f} | {r['ppl']:.3f} | {p['ppl'] - dense.ppl:+.3f} | "
              f"{r['ppl'] - dense.ppl:+.3f} | {p['seconds']:.0f} | {r['seconds']:.0f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
