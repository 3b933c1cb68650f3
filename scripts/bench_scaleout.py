"""Scale-out: one `lrc compress` run by 1 and by N processes (torchrun; gloo on CPU, NCCL with --device cuda).

    .venv/bin/python scripts/bench_scaleout.py                          # demo model, svd-llm-20, 1 vs 2 CPU processes
    .venv/bin/python scripts/bench_scaleout.py --model .cache/smollm2-135m-instruct --procs 1 2
    .venv/bin/python scripts/bench_scaleout.py --device cuda --procs 1 2 4 8     # a GPU node: 1..N GPUs

Each row launches `python -m torch.distributed.run --standalone --nproc-per-node N` on this script's worker,
which runs `lrc compress MODEL -r RECIPE -o TMP --no-plots` in-process with one thread per process
(OMP_NUM_THREADS=1 unless --threads) and records its own wall time and peak RSS (and peak CUDA memory). Columns:
  compress    rank 0's report timing `compress_total` (calibration forward + statistics + decomposition +
              collectives; no load, no save, no evaluation): what the processes split;
  statistics  the calibration forward passes and statistics (`statistics` in the report, collectives included);
  decomp.     the decompositions (each group by its owner process, then the broadcast);
  wall        the slowest process's whole command (interpreter start-up, load and save included);
  peak RSS    per process, MiB (peak CUDA MiB with --device cuda).
Speed-ups are 1 process's time over N processes'. The machine's other load is printed next to the table: on a
shared machine the seconds are noisy, the ratios less so. `--json PATH` keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: list[str]) -> None:
    """One rank: the CLI in-process, then its own figures to RECORD.rank{RANK}.json."""
    record = Path(os.environ["LRC_BENCH_RECORD"])
    t0 = time.perf_counter()
    code = 0
    try:
        from compressor.cli import main

        sys.argv = ["lrc", *args]
        main()
    except SystemExit as exc:
        code = exc.code or 0
    import torch

    rank = int(os.environ.get("RANK", "0"))
    figures = {"rank": rank, "wall": time.perf_counter() - t0, "exit": code,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    Path(f"{record}.rank{rank}.json").write_text(json.dumps(figures))
    sys.exit(code)


def launch(model: str, recipe: str, procs: int, device: str, threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="lrc-scaleout-") as tmp:
        out, record = Path(tmp) / "out", Path(tmp) / "record"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LRC_BENCH_RECORD": str(record),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                   str(Path(__file__).resolve()), "--worker", "compress", model, "-r", recipe, "-o", str(out),
                   "--no-plots", "--device", device, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{procs} processes failed:\n{proc.stderr[-4000:]}")
        timings = json.loads((out / "report.json").read_text())["timings_seconds"]
        ranks = [json.loads(Path(f"{record}.rank{r}.json").read_text()) for r in range(procs)]
    return {"procs": procs, "launch_wall": wall, "timings": timings, "ranks": ranks}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    from compressor.resources import demo_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_model_dir()))
    parser.add_argument("--recipe", default="svd-llm-20")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nsamples", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    extra = [x for o in args.overrides for x in ("--set", o)]
    if args.nsamples:
        extra += ["--nsamples", str(args.nsamples)]
    load_before = os.getloadavg()
    if Path(args.model).exists():  # the workers run elsewhere: a local path must not depend on this cwd
        args.model = str(Path(args.model).resolve())
    rows = [launch(args.model, args.recipe, n, args.device, args.threads, extra) for n in args.procs]
    load_after = os.getloadavg()

    from rich.console import Console
    from rich.table import Table

    base = rows[0]["timings"]
    table = Table(title=f"{args.recipe} on {Path(args.model).name}, {args.device}, {args.threads} thread(s) per process")
    for column in ("processes", "compress s", "statistics s", "decomp. s", "wall s", "peak RSS MiB per process",
                   "speed-up compress", "speed-up statistics", "speed-up wall"):
        table.add_column(column, justify="right")
    base_wall = max(r["wall"] for r in rows[0]["ranks"])
    for row in rows:
        t = row["timings"]
        wall = max(r["wall"] for r in row["ranks"])
        memory = " / ".join(f"{r['peak_rss_mib']:.0f}" + (f" (cuda {r['peak_cuda_mib']:.0f})"
                                                          if r["peak_cuda_mib"] is not None else "")
                            for r in row["ranks"])
        table.add_row(str(row["procs"]), f"{t.get('compress_total', 0):.1f}", f"{t.get('statistics', 0):.1f}",
                      f"{t.get('decomposition', 0):.1f}", f"{wall:.1f}", memory,
                      f"{base['compress_total'] / t['compress_total']:.2f}×",
                      f"{base['statistics'] / max(t['statistics'], 1e-9):.2f}×", f"{base_wall / wall:.2f}×")
    console = Console(width=200)
    console.print(table)
    console.print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "recipe": args.recipe, "device": args.device,
                                         "threads": args.threads, "load_before": load_before,
                                         "load_after": load_after, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
