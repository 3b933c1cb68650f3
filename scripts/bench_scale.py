"""Scale: what one decoder layer of Llama-2-7B / Llama-3-70B shape costs each built-in recipe, and the whole model.

    .venv/bin/python scripts/bench_scale.py --shapes 7b                       # every built-in recipe, 7B shape
    .venv/bin/python scripts/bench_scale.py --shapes 7b,70b --recipes rtn-4bit,svd-llm-20
    .venv/bin/python scripts/bench_scale.py --quick                           # a representative subset

The checkpoint: one decoder layer (num_hidden_layers=1) at the real hidden / intermediate / head sizes, a small
vocabulary (1024, the bundled demo tokenizer's) so the embeddings do not dominate, stored bf16 under
.cache/bench-scale-SHAPE (built once). Weights are synthetic with a decaying spectrum: W = U·diag(s)·Vᵀ with
s_i ∝ i^-alpha over a rank-`--spectrum-rank` orthonormal basis (QR of small random blocks: cheap), plus isotropic
noise holding 10% of the energy, scaled to entries of RMS 0.02. The embeddings get the same treatment, so the
layer's inputs are correlated as a trained model's are.

Each (shape, recipe) runs the real command line in a fresh child process:
    python -m compressor compress CKPT -r RECIPE -o OUT --low-memory --nsamples N --seqlen L --no-plots
with OMP_NUM_THREADS=MKL_NUM_THREADS=--threads. Measured: the child's peak RSS (os.wait4: that child only),
peak device memory (report.json, torch.cuda.max_memory_allocated, with --device cuda), peak bytes on disk
(journal `.OUT.partial` + temporary + output, polled every 0.2 s), the output's bytes, its decoder-layer shard's
bytes, wall seconds and the run's own timings.

Extrapolation (the table's caption and footer say it; the JSON keeps each row's `formula` terms):
  - calibration: N·L tokens are measured; token-proportional costs (statistics, Fisher pass, refinement, the
    journal's activation streams, the activations held in memory) are scaled linearly to --target-tokens
    (default 128×2048, what a user would run); the decomposition is independent of the token count.
  - seconds per layer at the target = decomposition + allocation + (compress_total − both) × target/measured;
    whole model = that × layers (32 for 7B, 80 for 70B).
  - output bytes: whole model = the decoder-layer shard × layers (embeddings and head at the real vocabulary
    are extra: vocab × hidden × 2 B × 2).
  - peak RSS and device memory do not grow with depth under --low-memory (one layer is resident at a time):
    whole model = measured + activations at the target tokens minus at the measured ones (tokens × hidden ×
    4 B × 2: layer inputs and outputs; × 2 again when the run keeps the dense model's stream too) + the real
    vocabulary's embeddings and head at fp32 (an upper bound: the embeddings are released after the first layer).
  - peak disk: whole model = output × layers + the resume journal's activations, 2 sets × target tokens ×
    hidden × 4 B (× 2 with the dense stream). A one-layer run writes no activations (no later layer reads them).
Formula estimates of peak RSS (weights fp32 + compressed copy + Gram matrices + activations + runtime) are given
next to the measurement; a shape/recipe not run is reported from the formula alone, labelled "not measured".
Seconds depend on what else runs on the machine; peak RSS and bytes do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
RUNTIME_BYTES = 0.9 * GIB  # Python + torch + transformers + lrc, resident before any weight (a toy run peaks at 0.94)
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               layers=32, vocab=32000, model="Llama-2-7B"),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                layers=80, vocab=128256, model="Llama-3-70B"),
    "toy": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                layers=2, vocab=1024, model="toy (script check)"),
}
QUICK = ("svd-llm-20", "rtn-4bit", "eora-4bit", "eora-gptq-4bit", "lowrank-40")
VOCAB = 1024  # the checkpoint's own vocabulary: the bundled demo tokenizer's


def builtin_recipes() -> list[str]:
    from compressor.recipe import builtin_names

    return builtin_names()


# ---------------------------------------------------------------------------------------------- checkpoint


def spectral_matrix(m: int, n: int, rank: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """m×n, entries of RMS 0.02: 90% of the energy in U·diag(i^-alpha)·Vᵀ (rank `rank`), 10% isotropic noise."""
    k = min(rank, m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    low = (u * s) @ v.T
    low *= (0.9 * m * n) ** 0.5 / low.norm()
    w = low.add_(torch.randn(m, n, generator=generator), alpha=0.1**0.5)
    return w.mul_(0.02)


def build_layer_checkpoint(folder: Path, shape: dict, *, rank: int = 256, alpha: float = 0.6, seed: int = 0) -> Path:
    """One decoder layer of `shape`, bf16, written once (a complete one is reused; built beside and renamed)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors").is_file():
        return folder
    config = LlamaConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], num_hidden_layers=1, vocab_size=VOCAB,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    with init_empty_weights():
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, size in shapes.items():
        w = torch.ones(size) if len(size) == 1 else spectral_matrix(*size, rank, alpha, generator)
        if name == "model.embed_tokens.weight":
            w *= 50  # unit-RMS inputs, as after a trained model's embeddings and norms
        tensors[name] = w.to(torch.bfloat16)
    # A temporary folder of this process's own: two sweeps started together each build one, the first rename wins
    # and the other keeps the winner's (the same seed gives the same tensors).
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "lrc-demo-llama" / file, tmp / file)
    try:
        tmp.rename(folder)
    except OSError:
        if not (folder / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------- measurement


def tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass  # renamed or deleted between listing and stat
    return total


def layer_shard_bytes(out: Path) -> int:
    """Bytes of the output's safetensors files that hold decoder-layer tensors (not embeddings, norm, head)."""
    index = out / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    files = {f for name, f in weight_map.items() if name.startswith("model.layers.")}
    return sum((out / f).stat().st_size for f in files)


def measure(checkpoint: Path, recipe: str, work: Path, *, nsamples: int, seqlen: int, threads: int,
            device: str = "cpu", timeout: float | None = None) -> dict:
    """One `lrc compress --low-memory` of `checkpoint` in a fresh child; what it cost (see the module docstring)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / "out"
    cmd = [sys.executable, "-m", "compressor", "compress", str(checkpoint), "-r", recipe, "-o", str(out),
           "--low-memory", "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--no-plots", "--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    peak_disk, stop = [0], threading.Event()

    def poll():  # everything under `work`: the journal, the temporary directory and the output
        while not stop.is_set():
            peak_disk[0] = max(peak_disk[0], tree_bytes(work))
            stop.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    log = work / "child.log"
    t0 = time.perf_counter()
    with open(log, "wb") as sink:
        child = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        poller.start()
        timer = threading.Timer(timeout, child.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the max over all children
        child.returncode = os.waitstatus_to_exitcode(status)
        if timer:
            timer.cancel()
    seconds = time.perf_counter() - t0
    stop.set()
    poller.join()
    row = {"recipe": recipe, "returncode": child.returncode, "wall_seconds": round(seconds, 2),
           "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_disk_bytes": max(peak_disk[0], tree_bytes(work))}
    if child.returncode != 0:
        row["timed_out"] = bool(timeout) and seconds >= timeout
        row["error"] = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        row["error"] = row["error"][0][-300:]
        return row
    collect(row, out)
    shutil.rmtree(work, ignore_errors=True)
    return row


def collect(row: dict, out: Path) -> dict:
    """What a finished run's output says: its bytes, its layer shard's, its device peak and timings."""
    report = json.loads((out / "report.json").read_text())
    row.update(output_bytes=tree_bytes(out), layer_bytes=layer_shard_bytes(out),
               peak_device_bytes=report.get("peak_memory", {}).get("gpu_peak_allocated_bytes"),
               timings=report.get("timings_seconds", {}))
    return row


# ---------------------------------------------------------------------------------------------- formulas


def layer_linears(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of each linear of one Llama decoder layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def recipe_needs(recipe: str) -> tuple[frozenset, int]:
    """The statistics the run collects (the method's, plus the report's Gram for its output error: a Gram-free
    method such as rtn still holds every input's Gram), and how many activation streams the run keeps: 2 when the
    dense model's activations walk beside the compressed ones (compressor/pipeline/sequential.py)."""
    from compressor import registry
    from compressor.pipeline.compression import REPORT_STATS
    from compressor.recipe import load_recipe

    r = load_recipe(recipe)
    needs = REPORT_STATS | registry.get(r.method).needs_for(r.method_options())
    dense = "cross" in needs or (r.refine.epochs > 0 and r.refine.target == "dense")
    return needs, 2 if dense and r.sequential.inputs == "compressed" else 1


def formulas(shape: dict, recipe: str, tokens: int) -> dict:
    """The terms of the peak-RSS estimate for one layer at `tokens` calibration tokens (bytes) and how each is
    computed. Distinct inputs of a Llama layer: q/k/v share one (hidden), o one (hidden), gate/up one (hidden),
    down one (intermediate)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    params = sum(m * n for m, n in layer_linears(shape))
    needs, streams = recipe_needs(recipe)
    gram_each = 1 + ("cross" in needs)
    terms = {
        "weights_fp32": (4 * params, "layer linears × 4 B"),
        "compressed_copy": (4 * params, "≤ layer linears × 4 B (the compressed layer while it is written)"),
        "grams": ((3 * h * h + i * i) * (8 if "gram" in needs else 4) * gram_each,
                  f"(3·hidden² + intermediate²) × {'8 B (fp64)' if 'gram' in needs else '4 B (fp32: only the report reads them)'}"
                  f"{' × 2 (cross)' if gram_each == 2 else ''}"),
        "activations": (tokens * h * 4 * 2 * streams, f"tokens × hidden × 4 B × 2 (layer inputs and outputs)"
                                                      f"{' × 2 (dense stream)' if streams == 2 else ''}"),
        "runtime": (int(RUNTIME_BYTES), "Python + torch + transformers"),
    }
    return {"params_per_layer": params, "needs": sorted(needs), "streams": streams,
            # the resume journal's activations beside the output: two sets while one replaces the other
            "journal_bytes": 2 * tokens * h * 4 * streams,
            "terms": {k: {"bytes": b, "formula": f} for k, (b, f) in terms.items()},
            "peak_rss_bytes": sum(b for b, _ in terms.values())}


def extrapolate(row: dict, shape: dict, tokens: int, target_tokens: int) -> dict:
    """The measured one-layer row at the target calibration size, and for the whole model (module docstring)."""
    scale, layers, h = target_tokens / tokens, shape["layers"], shape["hidden_size"]
    t = row["timings"]
    fixed = t.get("decomposition", 0.0) + t.get("allocation", 0.0)
    per_layer_s = fixed + max(t.get("compress_total", row["wall_seconds"]) - fixed, 0.0) * scale
    streams = row["formula"]["streams"]
    extra_act = (target_tokens - tokens) * h * 4 * 2 * streams
    vocab_fp32 = (shape["vocab"] - VOCAB) * h * 4 * 2
    # a one-layer run never journals activations (no later layer reads them): the whole model's are the formula's
    journal = 2 * target_tokens * h * 4 * streams
    device = row.get("peak_device_bytes")
    return {
        "seconds_per_layer": round(per_layer_s, 2),
        "seconds": round(per_layer_s * layers, 1),
        "output_bytes": row["layer_bytes"] * layers,
        "peak_disk_bytes": row["layer_bytes"] * layers + journal,
        "peak_rss_bytes": row["peak_rss_bytes"] + extra_act + vocab_fp32,
        "peak_device_bytes": None if device is None else device + extra_act + vocab_fp32,
    }


# ---------------------------------------------------------------------------------------------- table


def gib(b) -> str:
    return "–" if b is None else f"{b / GIB:.2f}"


def render_table(result: dict) -> str:
    target = result["target_tokens"]
    lines = [f"Calibration measured: {result['nsamples']}×{result['seqlen']} = {result['tokens']} tokens; "
             f"whole model extrapolated to {target} tokens (128×2048). Sizes in GiB. Seconds on {result['machine']}"
             f"{' (shared with other jobs: inflated)' if result['contended'] else ''}.", "",
             "| shape | recipe | status | peak RSS / layer run | formula RSS | peak device | disk peak / output "
             "(layer shard) | s / layer (wall) | s / layer at target | whole model: hours | RSS | device | output "
             "| disk peak |", "|" + "---|" * 14]
    for r in result["rows"]:
        w, f = r.get("whole_model") or {}, r["formula"]
        if r["status"] == "measured":
            lines.append(
                f"| {r['shape']} | {r['recipe']} | measured | {gib(r['peak_rss_bytes'])} | "
                f"{gib(f['peak_rss_bytes_at_measured'])} | {gib(r.get('peak_device_bytes'))} | "
                f"{gib(r['peak_disk_bytes'])} / {gib(r['output_bytes'])} ({gib(r['layer_bytes'])}) | "
                f"{r['timings'].get('compress_total', 0):.1f} ({r['wall_seconds']:.0f}) | "
                f"{w['seconds_per_layer']:.0f} | {w['seconds'] / 3600:.1f} | "
                f"{gib(w['peak_rss_bytes'])} | {gib(w['peak_device_bytes'])} | {gib(w['output_bytes'])} | "
                f"{gib(w['peak_disk_bytes'])} |")
        elif "peak_rss_bytes" in r:  # failed or killed by --timeout: what it had reached by then
            lines.append(f"| {r['shape']} | {r['recipe']} | {r['status']} | ≥ {gib(r['peak_rss_bytes'])} | "
                         f"{gib(f['peak_rss_bytes_at_measured'])} | – | – | > {r['wall_seconds']:.0f} (wall) | – | – | "
                         f"{gib(f['peak_rss_bytes_at_target'])} (formula) | – | – | – |")
        else:
            lines.append(f"| {r['shape']} | {r['recipe']} | {r['status']} | – | {gib(f['peak_rss_bytes_at_measured'])}"
                         f" | – | – | – | – | – | {gib(f['peak_rss_bytes_at_target'])} (formula) | – | – | – |")
    lines += ["", "Formula for peak RSS (one layer, --low-memory): " + " + ".join(
        f"{k} [{v['formula']}]" for k, v in result["rows"][0]["formula"]["terms"].items()) if result["rows"] else ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def row_formula(shape: dict, recipe: str, tokens: int, target_tokens: int) -> dict:
    f = formulas(shape, recipe, tokens)
    f["peak_rss_bytes_at_measured"] = f.pop("peak_rss_bytes")
    h = shape["hidden_size"]
    f["peak_rss_bytes_at_target"] = (f["peak_rss_bytes_at_measured"] + (target_tokens - tokens) * h * 8 *
                                     f["streams"] + (shape["vocab"] - VOCAB) * h * 8)
    return f


def run(shapes: list[str], recipes: list[str], *, nsamples: int, seqlen: int, target_tokens: int, threads: int,
        device: str, measure_shapes: set[str], cache: Path, work: Path, timeout: float | None,
        alpha: float, rank: int, log=print, on_row=None) -> dict:
    """Every (shape, recipe) row; `on_row(rows)` after each (a long run keeps what it has measured)."""
    tokens = nsamples * seqlen
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        checkpoint = None
        for recipe in recipes:
            row = {"shape": name, "recipe": recipe, "layers": shape["layers"],
                   "formula": row_formula(shape, recipe, tokens, target_tokens)}
            if name not in measure_shapes:
                rows.append({**row, "status": "not measured (formula)"})
                continue
            if checkpoint is None:
                t0 = time.perf_counter()
                checkpoint = build_layer_checkpoint(cache / f"bench-scale-{name}", shape, rank=rank, alpha=alpha)
                log(f"{name}: checkpoint {checkpoint} ({time.perf_counter() - t0:.0f} s)")
            m = measure(checkpoint, recipe, work / f"{name}-{recipe}", nsamples=nsamples, seqlen=seqlen,
                        threads=threads, device=device, timeout=timeout)
            row.update(m)
            if m["returncode"] == 0:
                row["status"] = "measured"
                row["whole_model"] = extrapolate(row, shape, tokens, target_tokens)
            else:
                row["status"] = (f"killed at --timeout {timeout:.0f} s" if m["timed_out"] else
                                 f"failed (exit {m['returncode']}): {m['error']}")
            log(f"{name} {recipe}: {row['status']}, {m['wall_seconds']:.0f} s, peak RSS {gib(m['peak_rss_bytes'])} GiB")
            rows.append(row)
            if on_row:
                on_row(rows)
    return {"date": str(date.today()), "nsamples": nsamples, "seqlen": seqlen, "tokens": tokens,
            "target_tokens": target_tokens, "threads": threads, "device": device,
            "machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {threads} threads",
            "torch": torch.__version__, "spectrum": {"alpha": alpha, "rank": rank}, "contended": True,
            "shapes": {n: SHAPES[n] for n in shapes}, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="7b", help="comma-separated, of: " + ", ".join(SHAPES) + " (default 7b)")
    p.add_argument("--recipes", default=None, help="comma-separated built-in recipe names (default: all of them)")
    p.add_argument("--quick", action="store_true", help="only " + ", ".join(QUICK))
    p.add_argument("--estimate-only", default="", help="comma-separated shapes reported from the formulas alone "
                   "(\"not measured\"), e.g. 70b on a machine too small or slow for it")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows measured (default 8)")
    p.add_argument("--seqlen", type=int, default=256, help="calibration window length measured (default 256)")
    p.add_argument("--target-tokens", type=int, default=128 * 2048, help="tokens extrapolated to (128×2048)")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each child (default 2)")
    p.add_argument("--device", default="cpu", help="compute device passed to lrc (cpu, cuda)")
    p.add_argument("--timeout", type=float, default=None, help="kill a child after this many seconds")
    p.add_argument("--spectrum-alpha", type=float, default=0.6, help="singular values ∝ i^-alpha (default 0.6)")
    p.add_argument("--spectrum-rank", type=int, default=256, help="rank of the decaying part (default 256)")
    p.add_argument("--quiet-machine", action="store_true", help="no other jobs ran: do not flag seconds")
    p.add_argument("--cache", default=str(ROOT / ".cache"), help="where the one-layer checkpoints are kept")
    p.add_argument("--work", default=str(ROOT / "out" / "bench-scale"), help="scratch space of the runs (emptied)")
    p.add_argument("--json", default=str(ROOT / "bench-results" / "scale.json"))
    p.add_argument("--markdown", default=None, help="also write the table here (default: JSON's name, .md)")
    p.add_argument("--render", default=None, metavar="PARTIAL_JSON", help="only print the table of the rows an "
                   "interrupted run left in SCALE.partial.json (with this run's calibration options)")
    args = p.parse_args(argv)
    if args.render:
        result = {**run([], [], nsamples=args.nsamples, seqlen=args.seqlen, target_tokens=args.target_tokens,
                        threads=args.threads, device=args.device, measure_shapes=set(), cache=Path(args.cache),
                        work=Path(args.work), timeout=None, alpha=args.spectrum_alpha, rank=args.spectrum_rank),
                  "rows": json.loads(Path(args.render).read_text()), "contended": not args.quiet_machine}
        for row in result["rows"]:  # formulas and extrapolation as this version of the script computes them
            row["formula"] = row_formula(SHAPES[row["shape"]], row["recipe"], result["tokens"], args.target_tokens)
            if row["status"] == "measured":
                row["whole_model"] = extrapolate(row, SHAPES[row["shape"]], result["tokens"], args.target_tokens)
        print(render_table(result))
        return result
    shapes = [s for s in args.shapes.split(",") if s]
    known = builtin_recipes()
    recipes = list(QUICK) if args.quick else args.recipes.split(",") if args.recipes else known
    for bad in [s for s in shapes if s not in SHAPES] + [r for r in recipes if r not in known]:
        p.error(f"unknown shape or recipe {bad!r} (shapes: {', '.join(SHAPES)}; recipes: {', '.join(known)})")
    estimate_only = set(filter(None, args.estimate_only.split(",")))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = lambda rows: out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=2))  # noqa: E731
    result = run(shapes, recipes, nsamples=args.nsamples, seqlen=args.seqlen, target_tokens=args.target_tokens,
                 threads=args.threads, device=args.device, measure_shapes=set(shapes) - estimate_only,
                 cache=Path(args.cache), work=Path(args.work), timeout=args.timeout,
                 alpha=args.spectrum_alpha, rank=args.spectrum_rank, log=lambda s: print(s, flush=True),
                 on_row=partial)
    result["contended"] = not args.quiet_machine
    result["command"] = " ".join(["scripts/bench_scale.py", *(argv if argv is not None else sys.argv[1:])])
    table = render_table(result)
    out.write_text(json.dumps(result, indent=2))
    Path(args.markdown or out.with_suffix(".md")).write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
