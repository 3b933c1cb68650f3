"""lrc against the quantisation tools users already run (llm-compressor GPTQ, AutoRound, HQQ) at equal bytes.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_peers.py --model .cache/smollm2-135m-instruct \
        --json docs/peers-smollm2.json --png docs/peers-smollm2.png
    .venv/bin/python scripts/bench_peers.py --from-json docs/peers-smollm2.json --png docs/peers-smollm2.png

Every tool sees the same calibration (nsamples x seqlen token windows of lrc's bundled train split, seed 0: the
windows `lrc compress --nsamples 64 --seqlen 256` draws) and every output is scored by the same evaluator
(`lrc eval --seqlen 256 --max-windows 40`, the bundled test split).

Each peer runs in its own virtual environment under .cache/peers/<tool> (created with pip on first use: its pins,
e.g. llm-compressor's transformers, must not touch lrc's), as a subprocess with a timeout (scripts/peer_worker.py).
It saves its own quantised checkpoint, whose bytes are read from the files (the targeted linears' tensors from the
safetensors headers, the whole checkpoint from the weight files' sizes), and a dense float32 copy read back from that
checkpoint by the tool's own loader, which lrc's evaluator scores. A peer that cannot be installed or run is a row
that says why. Then lrc: `lrc compress --target-size` at each peer's targeted-linear bytes (plus the bytes lrc keeps
dense: embeddings and norms, which each tool stores as it likes and the checkpoint column shows), and lrc's gptq /
eora recipes at 4 and 3 bits. Rows are cached in .cache/peers/runs/<row>/row.json: a second run only fills in
what is missing (--fresh redoes everything). Timings are wall seconds of the compression itself, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

# scripts/ is sys.path[0] when this file runs as a script
from peers_lib import checkpoint_bytes, ensure_venv, format_table, last_error, plot, rest_bytes, target_bytes

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "scripts" / "peer_worker.py"
# pip requirement of each peer's venv (versions pinned: the table names them)
PEERS = {"llmcompressor": ["llmcompressor==0.14.0.1"], "autoround": ["auto-round==0.16.1"],
         "hqq": ["hqq==0.2.8.post1"]}


@dataclass(frozen=True)
class PeerJob:
    tool: str
    bits: int
    group_size: int | None = None  # None: the tool's default
    iters: int | None = None  # AutoRound only
    options: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        return "-".join(str(p) for p in (self.tool, f"w{self.bits}", self.group_size and f"g{self.group_size}",
                                         self.iters is not None and f"i{self.iters}") if p)


def peer_jobs(autoround_iters: int) -> list[PeerJob]:
    # llm-compressor's W4A16 preset is g128; SmolLM2's 576-wide linears do not divide by 128, which it refuses
    # (that row says so), so g64, the largest group that divides every width, is run as well.
    return [PeerJob("llmcompressor", b, g) for b in (4, 3) for g in (128, 64)] + \
           [PeerJob("autoround", b, 128, autoround_iters) for b in (4, 3)] + \
           [PeerJob("hqq", b) for b in (4, 3)]


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """Run `cmd` with its output in `log`; (exit code or None on timeout, the output)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, env=env)
            rc = code.returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, log.read_text(errors="replace")


def evaluate(folder: Path, args, log: Path) -> float:
    """Perplexity by `lrc eval` (the same command for every row), run in lrc's own environment."""
    cmd = [sys.executable, "-m", "compressor", "eval", str(folder), "--seqlen", str(args.eval_seqlen),
           "--max-windows", str(args.max_windows), "--json"]
    rc, text = run_logged(cmd, log, args.timeout)
    if rc != 0:
        raise RuntimeError(f"lrc eval failed: {last_error(text)}")
    return json.loads(text[text.index("{"):])["ppl"]


def run_peer(job: PeerJob, args, calib: Path, work: Path) -> dict:
    row = {"tool": job.tool, "bits": job.bits, "version": PEERS[job.tool][0].split("==")[1],
           "setting": f"w{job.bits}" + (f" g{job.group_size}" if job.group_size else "")}
    try:
        python = ensure_venv(args.venvs / job.tool, PEERS[job.tool], work / "install.log", args.timeout)
    except (subprocess.SubprocessError, OSError) as e:
        return {**row, "error": f"pip install {' '.join(PEERS[job.tool])} failed ({type(e).__name__}); see "
                                f"{work / 'install.log'}"}
    cmd = [str(python), str(WORKER), job.tool, "--bits", str(job.bits), "--model", args.model, "--calib", str(calib),
           "--out", str(work), "--threads", str(args.threads)]
    if job.group_size:
        cmd += ["--group-size", str(job.group_size)]
    if job.iters is not None:
        cmd += ["--iters", str(job.iters)]
    rc, text = run_logged(cmd, work / "worker.log", args.timeout)
    if rc is None:
        return {**row, "error": f"timed out after {args.timeout:.0f} s"}
    if rc != 0:
        return {**row, "error": last_error(text)}
    result = json.loads((work / "result.json").read_text())
    quantized = work / "quantized"
    row.update(version=result["version"], setting=result["setting"], seconds=result["seconds"],
               checkpoint_bytes=checkpoint_bytes(quantized),
               target_bytes=target_bytes(quantized) or result.get("target_bytes"))
    row["ppl"] = evaluate(work / "dense", args, work / "eval.log")
    return row


def run_lrc(label: str, recipe: str | None, overrides: list[str], args, work: Path, *, size: int | None = None,
            bits: int | None = None) -> dict:
    import compressor

    out = work / "out"
    cmd = [sys.executable, "-m", "compressor", "compress", args.model, "-o", str(out), "--overwrite", "--no-plots",
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0"]
    cmd += (["--recipe", recipe] if recipe else []) + (["--target-size", str(size)] if size else [])
    for o in overrides:
        cmd += ["--set", o]
    row = {"tool": "lrc", "version": compressor.__version__, "setting": label, "bits": bits}
    rc, text = run_logged(cmd, work / "compress.log", args.timeout)
    if rc != 0:
        return {**row, "error": "timed out" if rc is None else last_error(text)}
    report = json.loads((out / "report.json").read_text())
    row.update(seconds=report["timings_seconds"].get("compress_total"), checkpoint_bytes=checkpoint_bytes(out),
               target_bytes=target_bytes(out), ppl=evaluate(out, args, work / "eval.log"))
    return row


def cached(work: Path, fresh: bool, make, stored_only: bool = False) -> dict:
    """The row stored at work/row.json, else make() it (in a clean folder) and store it; with `stored_only`, a row
    not stored yet is reported as not run (and a run in progress there is left alone)."""
    path = work / "row.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    if stored_only:
        return {"error": "did not fit the recorded session's time box"}
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    start = time.perf_counter()
    try:
        row = make()
    except Exception as e:  # a row that failed after its tool ran (evaluation, reading the files) still says why
        row = {"error": f"{type(e).__name__}: {e}"[:300]}
    row["total_seconds"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(row, indent=1))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / ".cache" / "smollm2-135m-instruct"))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every subprocess")
    parser.add_argument("--autoround-iters", type=int, default=50, help="50: AutoRound's light setting")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each subprocess")
    parser.add_argument("--only", nargs="*", help="rows whose key contains one of these (e.g. hqq, lrc-gptq)")
    parser.add_argument("--no-lrc", action="store_true", help="run the peers only")
    parser.add_argument("--fresh", action="store_true", help="redo rows already stored under --work")
    parser.add_argument("--stored-only", action="store_true",
                        help="tabulate the rows stored under --work; the others are rows that say they were not run")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "peers" / "runs")
    parser.add_argument("--venvs", type=Path, default=ROOT / ".cache" / "peers")
    parser.add_argument("--json", type=Path, default=Path("bench-results/peers.json"))
    parser.add_argument("--png", type=Path, default=Path("bench-results/peers.png"))
    parser.add_argument("--from-json", type=Path, help="print and plot a stored result instead of measuring")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        print(format_table(data["rows"], data["dense_ppl"]))
        print(plot(data, args.png))
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every subprocess
    import torch

    torch.set_num_threads(args.threads)
    model_tag = Path(args.model).name
    work = args.work / model_tag
    work.mkdir(parents=True, exist_ok=True)
    calib = work / f"calib-{args.nsamples}x{args.seqlen}.pt"
    if not calib.is_file():
        torch.save(calibration(args), calib)
    wanted = lambda key: not args.only or any(o in key for o in args.only)  # noqa: E731

    dense = cached(work / "dense", False, lambda: {"tool": "dense", "setting": "float32", "ppl": evaluate(
        Path(args.model), args, work / "dense" / "eval.log"), "checkpoint_bytes": checkpoint_bytes(Path(args.model)),
        "target_bytes": target_bytes(Path(args.model))})
    rows = []
    for job in peer_jobs(args.autoround_iters):
        if wanted(job.key):
            rows.append(row := cached(work / job.key, args.fresh, lambda: run_peer(job, args, calib, work / job.key),
                                     args.stored_only))
            row.setdefault("tool", job.tool)
            row.setdefault("version", PEERS[job.tool][0].split("==")[1])
            row.setdefault("setting", job.key)
            row["short"] = f"w{job.bits}"
            print(f"{job.key}: {row.get('ppl', row.get('error'))}", flush=True)
    if not args.no_lrc:
        rows += lrc_rows(rows, dense, args, work, wanted)
    data = {"model": args.model, "date": str(date.today()), "dense_ppl": dense["ppl"],
            "dense_checkpoint_bytes": dense["checkpoint_bytes"], "dense_target_bytes": dense["target_bytes"],
            "eval": {"data": "bundled test split", "seqlen": args.eval_seqlen, "windows": args.max_windows},
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0,
                            "source": "bundled train split"},
            "threads": args.threads, "note": "wall seconds on a shared 2-core CPU machine, one thread per run",
            "platform": {"machine": platform.processor() or platform.machine(), "torch": torch.__version__},
            "rows": [dense | {"tool": "dense", "version": "—", "short": "dense"}] + rows}
    table = format_table(data["rows"], dense["ppl"])
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1))
    print(plot(data, args.png))


def lrc_rows(peers: list[dict], dense: dict, args, work: Path, wanted) -> list[dict]:
    """lrc at every peer's measured bytes (--target-size), then its gptq and eora recipes at 4 and 3 bits."""
    rows = []
    # embeddings and norms, which lrc keeps as they are (tensor bytes: lrc's budget counts no file header)
    kept_dense = rest_bytes(Path(args.model)) or dense["checkpoint_bytes"] - dense["target_bytes"]
    done: dict[int, dict] = {}  # target bytes -> lrc row: peers within 0.1 % of each other share one lrc run
    for peer in peers:
        if peer.get("error") or not peer.get("target_bytes"):
            continue
        twin = next((b for b in done if abs(b - peer["target_bytes"]) <= 1e-3 * b), None)
        if twin is not None:
            done[twin]["short"] += f", {peer['tool']} {peer['short']}"
            continue
        size = peer["target_bytes"] + kept_dense
        key = f"lrc-target-{peer['target_bytes']}"
        if wanted(key):
            label = f"--target-size {size} (= {peer['tool']} {peer['short']} targets + lrc's dense rest)"
            rows.append(row := cached(work / key, args.fresh, lambda: run_lrc(label, None, [], args, work / key,
                                                                               size=size, bits=peer["bits"]),
                                      args.stored_only))
            row.setdefault("tool", "lrc")
            row.setdefault("setting", label)
            row["short"] = f"@{peer['tool']} {peer['short']}"
            done[peer["target_bytes"]] = row
            print(f"{key}: {row.get('ppl', row.get('error'))}", flush=True)
    for bits in (4, 3):
        for name, recipe, overrides in (("gptq", "rtn-4bit", ["method=gptq", f"bits={bits}"]),
                                        ("eora", "eora-gptq-4bit", [f"bits={bits}"])):
            key = f"lrc-{name}-w{bits}"
            if wanted(key):
                label = f"{recipe} " + " ".join(f"--set {o}" for o in overrides)
                rows.append(row := cached(work / key, args.fresh, lambda: run_lrc(label, recipe, overrides, args,
                                                                                   work / key, bits=bits),
                                          args.stored_only))
                row.setdefault("tool", "lrc")
                row.setdefault("setting", label)
                row["short"] = f"{name} w{bits}"
                print(f"{key}: {row.get('ppl', row.get('error'))}", flush=True)
    return rows


def calibration(args):
    """lrc's own calibration windows (compressor.data), the ones `lrc compress` draws with seed 0."""
    from transformers import AutoTokenizer

    from compressor.data import calibration_batch, load_texts

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    docs, _ = load_texts(None, split_default="train")
    return calibration_batch(tokenizer, docs, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)


if __name__ == "__main__":
    main()
