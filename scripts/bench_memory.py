"""Memory: compress a ~1B-shaped checkpoint under a hard memory cap smaller than the model, with --low-memory.

    .venv/bin/python scripts/bench_memory.py                      # build .cache/synthetic-1b once, then compress
    .venv/bin/python scripts/bench_memory.py --recipe svd-20 --cap-gb 3
    .venv/bin/python scripts/bench_memory.py --checkpoint .cache/qwen2.5-coder-1.5b-instruct -r svd-llm-20 \
        --nsamples 64 --json bench-results/memory-qwen15-svd-llm-20.json   # a real model (scripts/prepare_qwen15.py)
    .venv/bin/python scripts/bench_memory.py --checkpoint .cache/qwen2.5-coder-1.5b-instruct --target-size 0.3 ...

The checkpoint: TinyLlama-1.1B's shape (22 layers, hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab
32000), random weights (scale 0.02), stored bf16 as one safetensors shard per layer: 2.2 GB on disk, 4.4 GB at the
fp32 compute precision lrc uses on CPU. It is written layer by layer, so building it never holds the model either.

The compression runs `lrc compress --low-memory` in a child process inside a Linux memory cgroup (v1 or v2)
whose limit is the cap: going over it gets the child killed, so a finished run *is* the proof. Peak RSS of the
child (getrusage) and the cgroup's peak usage (which also counts reclaimable page cache of the mmapped and
written safetensors) are reported next to "2 GB + one decoder layer" (the issue's bound). Without a writable
cgroup the run is uncapped and says so. An existing checkpoint given by `--checkpoint` (any decoder-only model
transformers knows, e.g. the real Qwen2.5-Coder-1.5B) is used as it is; "one decoder layer" is then computed from
its config. The disk column is the peak, polled every 0.5 s, of everything the run writes beside the output
(the resume journal `.OUT.partial`, the temporary output) plus the output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import tree_bytes  # noqa: E402
from synthetic import SHAPES, build_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = SHAPES["1b"]
GB = 1024**3


class MemoryCgroup:
    """A memory-limited cgroup for one child process (v2 `memory.max` or v1 `memory.limit_in_bytes`)."""

    def __init__(self, limit: int):
        self.limit, self.path, self.v2 = limit, None, False
        for root, v2 in ((Path("/sys/fs/cgroup"), True), (Path("/sys/fs/cgroup/memory"), False)):
            probe = root / ("cgroup.controllers" if v2 else "memory.limit_in_bytes")
            if probe.exists() and (not v2 or "memory" in probe.read_text()):
                try:
                    path = root / f"lrc-bench-{os.getpid()}"
                    path.mkdir()
                    (path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
                    if not v2:
                        swap = path / "memory.memsw.limit_in_bytes"
                        if swap.exists():
                            swap.write_text(str(limit))
                    self.path, self.v2 = path, v2
                    return
                except OSError:
                    continue

    def preexec(self):
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        if self.path is None:
            return None
        file = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(file.read_text()) if file.exists() else None

    def killed_for_memory(self) -> bool:
        if self.path is None:
            return False
        events = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        text = events.read_text() if events.exists() else ""
        return any(line.split()[0] in ("oom_kill", "oom_kill_disable") and line.split()[1] != "0"
                   for line in text.splitlines() if len(line.split()) == 2 and line.split()[0] == "oom_kill")

    def remove(self):
        if self.path is not None:
            self.path.rmdir()


def layer_bytes_fp32(folder: Path) -> int:
    """One decoder layer's parameters × 4 B, from config.json (attention biases counted when the family has them)."""
    config = json.loads((folder / "config.json").read_text())
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    bias = (heads * head_dim + 2 * kv) if config.get("model_type") == "qwen2" or config.get("attention_bias") else 0
    return 4 * (2 * heads * head_dim * h + 2 * kv * h + 3 * h * inter + 2 * h + bias)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / ".cache" / "synthetic-1b"))
    parser.add_argument("-r", "--recipe", default="rtn-4bit")
    parser.add_argument("--in-memory", action="store_true", help="without --low-memory (and uncapped): the "
                                                                      "reference for the --low-memory peak")
    parser.add_argument("--target-size", default=None, help="passed to lrc compress (then the recipe is `auto` "
                                                             "unless -r names another)")
    parser.add_argument("--cap-gb", type=float, default=None, help="default: 2 GiB + one decoder layer at fp32")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "memory.json"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    given = Path(args.checkpoint)
    real = (given / "config.json").is_file() and given.resolve() != (ROOT / ".cache" / "synthetic-1b").resolve()
    folder = given if real else build_checkpoint(given, SHAPE)
    build_seconds = time.perf_counter() - t0
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    layer_fp32 = layer_bytes_fp32(folder)
    config = json.loads((folder / "config.json").read_text())
    stored = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    width = 4 if stored == "float32" else 2
    label = args.recipe if args.target_size is None else f"{args.recipe}-target-{args.target_size}"
    label += "-in-memory" if args.in_memory else ""
    work = ROOT / "out" / f"bench-memory-{folder.name}-{label}"
    out = work / "out"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "compressor.cli", "compress", str(folder), "-r", args.recipe, "-o", str(out),
           "--overwrite", "--no-plots", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    cmd += [] if args.in_memory else ["--low-memory"]
    if args.target_size is not None:
        cmd += ["--target-size", args.target_size]
    disk_peak = [0]
    stop = threading.Event()

    def poll():  # the journal, the temporary output and the output, all under `work`
        while not stop.wait(0.5):
            disk_peak[0] = max(disk_peak[0], tree_bytes(work))

    cap = int(args.cap_gb * GB) if args.cap_gb else 2 * GB + layer_fp32
    cgroup = MemoryCgroup(cap) if not args.in_memory else MemoryCgroup(1 << 62)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t1 = time.perf_counter()
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        done = subprocess.run(cmd, preexec_fn=cgroup.preexec, capture_output=True, text=True)
        seconds = time.perf_counter() - t1
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        cgroup_peak = cgroup.peak()
    finally:
        stop.set()
        poller.join()
        cgroup.remove()
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    report = json.loads((out / "report.json").read_text()) if done.returncode == 0 else {}
    result = {
        "date": str(date.today()), "recipe": args.recipe, "target_size": args.target_size,
        "checkpoint": str(folder), "shape": None if real else SHAPE, "command": " ".join(cmd[1:]),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2), "disk_peak_bytes": disk_peak[0],
        "checkpoint_bytes": on_disk, "checkpoint_dtype": stored, "model_bytes_fp32": on_disk * 4 // width,
        "one_layer_bytes_fp32": layer_fp32,
        "cap_bytes": cap if cgroup.path and not args.in_memory else None,
        "cgroup": ("v2" if cgroup.v2 else "v1") if cgroup.path else "unavailable (uncapped run)",
        "returncode": done.returncode, "seconds": round(seconds, 1), "build_seconds": round(build_seconds, 1),
        "peak_rss_bytes": peak_rss if peak_rss > before * 1024 else None, "cgroup_peak_bytes": cgroup_peak,
        "bound_bytes": 2 * GB + layer_fp32, "calibration": f"{args.nsamples}x{args.seqlen}",
        "timings_seconds": report.get("timings_seconds"), "output_bytes": sum(f.stat().st_size for f in out.glob(
            "*.safetensors")) if done.returncode == 0 else None,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    fmt = lambda b: "n/a" if b is None else f"{b / GB:.2f} GiB"  # noqa: E731
    print(f"checkpoint {folder.name}: {fmt(on_disk)} {stored} on disk, {fmt(on_disk * 4 // width)} at fp32; one layer "
          f"{fmt(layer_fp32)} fp32")
    print(f"{label}{'' if args.in_memory else ' --low-memory'}, calibration {args.nsamples}×{args.seqlen}, memory cap "
          f"{fmt(result['cap_bytes'])} ({result['cgroup']}): exit {done.returncode} after {seconds:.0f} s")
    print(f"peak RSS {fmt(result['peak_rss_bytes'])}; cgroup peak (incl. page cache) {fmt(cgroup_peak)}; "
          f"bound 2 GiB + one layer = {fmt(result['bound_bytes'])}; output {fmt(result['output_bytes'])}; disk peak "
          f"(journal + output) {fmt(disk_peak[0])}; load average at the end {result['load_average_1m_at_end']}")
    if done.returncode == 0:
        report = json.loads((out / "report.json").read_text())
        print(json.dumps({k: report[k] for k in ("timings_seconds", "size") if k in report}, indent=1)[:2000])
    sys.exit(0 if done.returncode == 0 else 1)


if __name__ == "__main__":
    main()
