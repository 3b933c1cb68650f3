"""Inference speed and memory of compressed models against the dense one, side by side in one run.

    .venv/bin/python scripts/bench_inference.py --threads 1             # the shipped demo model, CPU
    .venv/bin/python scripts/bench_inference.py --threads 1 --model .cache/smollm2-135m-instruct \\
        --workdir /tmp/bench-smollm2            # keep the checkpoints; --reuse measures them again without compressing
    .venv/bin/python scripts/bench_inference.py --device cuda --synthetic 1b   # random TinyLlama-shaped model

Models: dense; "dense Wᵀ" (the dense checkpoint with its decoder linears' weights transposed in memory, the layout
the low-rank modules take at load time: a control that shows how much of their speed is layout, not rank; off with
--no-dense-transposed); and one checkpoint per recipe (--recipes; default svd-llm-20, svd-llm-40, rtn-4bit,
eora-4bit, lowrank-sparse-50), calibrated on a few windows (only speed is measured here; lowrank-sparse-50 runs 10
alternating iterations instead of 40: the same rank and nnz, so the same speed). Every model is compressed once,
saved, and benchmarked as reloaded by `load_compressed` (what a user runs: packed int4 kernels for QuantLinear,
CSR or merged products for LowRankSparseLinear, transposed factors for LowRankLinear; compressor/nn/kernels.py).
`--synthetic 1b` builds a random-weight Llama of TinyLlama-1.1B's shape and uses plain `svd` at 20/40% and rtn-4bit
(calibration means nothing on random weights); use it with --device cuda (a CPU run takes ~40 min).
`--threads` defaults to torch's; on a machine shared with other jobs use --threads 1 (OpenMP threads that wait
for a busy core make a 2-thread run several times slower and its ratios noise).

Workloads (the same seeded random token ids for every model): prefill of 8 × seqlen tokens (one forward that builds
the KV cache and computes only the last position's logits, as generate() does); decode at batch 1 and 8 = greedy
generate() with the KV cache and `new_tokens` forced (min_new_tokens), timed as t(new_tokens) − t(1 token) so the
prompt's prefill cancels; tokens/s = batch × (new_tokens − 1) / that time. A warm-up round, then `repeats` rounds
interleaving the models (drift on a shared machine hits all alike); medians. Memory: "weights" = bytes of parameters
and buffers (what the checkpoint stores, as loaded), "+kernels" = the inference copies built from them at load time
(packed int4 weights, merged or CSR sparse products, fused factors); peak = weights + kernels + peak allocation
growth over one run of every workload (GPU: max_memory_allocated; CPU: a subprocess per model that warms up, resets
VmHWM via /proc/self/clear_refs and runs again with a fixed glibc mmap threshold — in one process, heap freed by one
model hides the next one's peak; measured repeatable to <1 MiB).

Where the speed comes from, on one CPU thread (docs/benchmarks.md has the tables): decode is bound by reading
the weights once per token. rtn-4bit's packed int4 kernel reads an eighth of fp32's bytes (torch's CPU kernel is
vectorised for bf16 activations only, so activations are cast to bf16 around it); low rank reads r(m+n)/(mn) of
them (0.8 at 20% removed, 0.6 at 40%) in two GEMMs, which BLAS runs well only with the factors' transposes
contiguous — the "dense Wᵀ" row shows the same layout's effect on the dense model. The untouched lm_head (tied
to a 49k-token embedding on SmolLM2) is a fixed share of every model's decode time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

from compressor import api
from compressor.recipe import load_recipe
from compressor.resources import demo_model_dir

RECIPES = ("svd-llm-20", "svd-llm-40", "rtn-4bit", "eora-4bit", "lowrank-sparse-50")
# Speed does not depend on how long the sparse/low-rank split was optimised (same rank, same nnz): fewer iterations.
RECIPE_OVERRIDES = {"lowrank-sparse-50": ("options.iterations=10",)}

# TinyLlama-1.1B's shape (random weights; nothing is downloaded).
SYNTHETIC = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)}


@dataclass(frozen=True)
class Workload:
    vocab_size: int
    seqlen: int = 256
    prefill_batches: tuple[int, ...] = (8,)
    decode_batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 32
    new_tokens: int = 64
    seed: int = 0

    def inputs(self, device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        ids = {f"prefill {b}×{self.seqlen}": torch.randint(self.vocab_size, (b, self.seqlen), generator=g)
               for b in self.prefill_batches}
        for b in self.decode_batches:
            ids[f"prompt b{b}"] = torch.randint(self.vocab_size, (b, self.prompt_len), generator=g)
        return {k: v.to(device) for k, v in ids.items()}


def weight_bytes(model) -> int:
    """Bytes of every distinct parameter and buffer (QuantLinear keeps its packed weights in buffers)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kernel_bytes(model) -> int:
    """Bytes of the inference copies compressed modules build at load time (packed int4/int8 weights, CSR or merged
    sparse products, fused factors): held next to the stored tensors, not saved."""
    return sum(m.kernel_bytes() for m in model.modules() if hasattr(m, "kernel_bytes"))


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _generate(model, prompt, n):
    pad = model.generation_config.pad_token_id
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, use_cache=True, pad_token_id=0 if pad is None else pad)
    if out.shape[1] != prompt.shape[1] + n:
        raise RuntimeError(f"generate() returned {out.shape[1] - prompt.shape[1]} tokens instead of {n}")


@torch.inference_mode()
def run_once(model, workload: Workload, inputs, device) -> dict[str, float]:
    """Seconds of each workload, run once."""
    seconds = {}
    for key, ids in inputs.items():
        b = key.removeprefix("prompt ")
        runs = [(key, lambda: model(ids, use_cache=True, logits_to_keep=1))] if not key.startswith("prompt") else [
            (f"generate {b} 1", lambda: _generate(model, ids, 1)),
            (f"generate {b} {workload.new_tokens}", lambda: _generate(model, ids, workload.new_tokens))]
        for name, call in runs:
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            seconds[name] = time.perf_counter() - t0
    return seconds


def record(model, workload: Workload, seconds: dict[str, float]) -> dict:
    n = workload.new_tokens
    decode = {}
    for b in workload.decode_batches:
        decode_s = seconds[f"generate b{b} {n}"] - seconds[f"generate b{b} 1"]
        decode[f"b{b}"] = b * (n - 1) / decode_s if decode_s > 0 else float("nan")
    return {
        "weight_bytes": weight_bytes(model),
        "kernel_bytes": kernel_bytes(model),
        "prefill_tok_s": {f"{b}×{workload.seqlen}": b * workload.seqlen / seconds[f"prefill {b}×{workload.seqlen}"]
                          for b in workload.prefill_batches},
        "decode_tok_s": decode,
        "seconds": seconds,
    }


def measure(models: dict, workload: Workload, *, device="cpu", repeats: int = 5) -> dict[str, dict]:
    """{label: record} for models already on `device`: warm-up, `repeats` interleaved rounds, medians.
    On CUDA each record also has `peak_bytes` (weights + peak allocation growth over one run of every workload)."""
    inputs = workload.inputs(device)
    for model in models.values():
        run_once(model, workload, inputs, device)
    rounds = {label: [] for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            rounds[label].append(run_once(model, workload, inputs, device))
    records = {}
    for label, model in models.items():
        median = {k: statistics.median(r[k] for r in rounds[label]) for k in rounds[label][0]}
        records[label] = record(model, workload, median)
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run_once(model, workload, inputs, device)
            growth = torch.cuda.max_memory_allocated(device) - base
            records[label]["peak_bytes"] = records[label]["weight_bytes"] + records[label]["kernel_bytes"] + growth
    return records


def load(path, kind: str, dtype, device):
    """kind "lrc": an lrc checkpoint as `load_compressed` returns it ("lrc-fused": with fuse_siblings); "dense": the checkpoint as transformers loads
    it; "dense-T": the same with every decoder linear's weight transposed in memory, the layout lrc's low-rank
    modules take at load time (LowRankLinear.prepare) — the control that separates the layout's share of their speed
    from the rank's."""
    if kind in ("lrc", "lrc-fused"):
        return api.load_compressed(path, dtype=dtype, device=device, fuse_siblings=kind == "lrc-fused").eval()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if kind == "dense-T":
        from compressor.nn.kernels import transpose_in_memory

        transpose_in_memory(*[m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and
                               m is not model.get_output_embeddings()])
    return model


def _proc_status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def probe_rss(path, kind, dtype, workload: Workload, threads) -> int:
    """This process: load, reset the RSS high-water mark, run every workload once; weights + growth."""
    torch.set_num_threads(threads)
    model = load(path, kind, dtype, "cpu")
    inputs = workload.inputs("cpu")
    run_once(model, workload, inputs, "cpu")  # lazy imports and one-off library state are not the model's
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)
    base = _proc_status("VmRSS")
    run_once(model, workload, inputs, "cpu")
    return weight_bytes(model) + kernel_bytes(model) + _proc_status("VmHWM") - base


def peak_rss_subprocess(path, kind, dtype, workload, threads) -> int:
    cmd = [sys.executable, __file__, "--probe", str(path), "--probe-kind", kind,
           "--dtype", str(dtype).removeprefix("torch."), "--probe-workload", json.dumps(asdict(workload)),
           "--threads", str(threads)]
    # A fixed mmap threshold turns off glibc's adaptive one: every tensor of 64 KiB or more is mapped on allocation
    # and unmapped on free, so the warm-up run's freed memory is not silently reused by the measured run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"peak-RSS subprocess for {path} failed:\n{run.stderr[-2000:]}")
    return int(run.stdout.strip().splitlines()[-1])


def build_checkpoints(args, out: Path, device) -> tuple[Path, list[tuple[str, Path]], torch.dtype]:
    """(dense checkpoint dir, [(label, compressed checkpoint dir)], compute dtype); each model compressed once."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    calib = [f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.calib_seqlen}"]
    if args.synthetic:
        rows = [(f"svd-{cut}", "svd-20", [f"param_ratio={1 - cut / 100:g}"]) for cut in (20, 40)]
        rows += [(name, name, []) for name in args.recipes if name == "rtn-4bit"]
    else:
        rows = [(name, name, list(RECIPE_OVERRIDES.get(name, ()))) for name in args.recipes]
        # `auto` at several sizes (size_ratio: the targets' bytes / their dense bytes), one row each
        rows += [(f"auto {size:g}", "auto", [f"options.size_ratio={size:g}"]) for size in args.auto_sizes]
    if args.synthetic:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SYNTHETIC[args.synthetic])).to(torch.bfloat16)
        dense_dir = out / f"synthetic-{args.synthetic}"
        model.save_pretrained(dense_dir)
        del model
        batches = torch.randint(SYNTHETIC[args.synthetic]["vocab_size"], (args.nsamples, args.calib_seqlen),
                                generator=torch.Generator().manual_seed(0))
    else:
        dense_dir = Path(args.model)
        batches, _ = api.calibration_data(AutoTokenizer.from_pretrained(dense_dir), load_recipe(rows[0][1], calib))
    storage = AutoConfig.from_pretrained(dense_dir).dtype or torch.float32
    storage = getattr(torch, storage) if isinstance(storage, str) else storage
    compute = args.torch_dtype or (storage if str(device).startswith("cuda") else torch.float32)
    saved = []
    for label, name, overrides in rows:
        saved_dir = out / name / label.replace(" ", "-")
        if args.reuse and (saved_dir / "config.json").is_file():
            saved.append((label, saved_dir))
            print(f"reusing {saved_dir}")
            continue
        t0 = time.perf_counter()
        model = load(dense_dir, False, compute, "cpu")  # the runner moves one layer at a time to `device`
        result = api.compress(model, load_recipe(name, calib + overrides), batches=batches, device=device,
                              storage_dtype=storage)
        saved.append((label, result.save(saved_dir, overwrite=True)))
        print(f"compressed {label} in {time.perf_counter() - t0:.1f} s")
        del model, result
    return dense_dir, saved, compute


def print_table(records: dict, title: str, caption: str):
    """Absolute tokens/s and MiB, and ratios vs dense (tokens/s: > 1 is faster; memory: < 1 is smaller). "weights"
    are the stored tensors as loaded; "+kernels" the inference copies built from them at load time (kernel_bytes)."""
    from rich.console import Console
    from rich.table import Table

    dense = records["dense"]
    speeds = [(f"prefill {k}", lambda r, k=k: r["prefill_tok_s"][k]) for k in dense["prefill_tok_s"]]
    speeds += [(f"decode {k}", lambda r, k=k: r["decode_tok_s"][k]) for k in dense["decode_tok_s"]]
    table = Table(title=title, caption=caption)
    table.add_column("model", no_wrap=True)
    for name in ["weights MiB", "+kernels MiB", "weights ×", "peak MiB", "peak ×"]:
        table.add_column(name, justify="right")
    for name, _ in speeds:
        table.add_column(f"{name} tok/s", justify="right")
        table.add_column(f"{name} ×", justify="right")
    for label, rec in records.items():
        peak = rec.get("peak_bytes")
        cells = [label, f"{rec['weight_bytes'] / 2**20:.1f}", f"{rec['kernel_bytes'] / 2**20:.1f}",
                 f"{rec['weight_bytes'] / dense['weight_bytes']:.2f}", f"{peak / 2**20:,.0f}" if peak else "n/a",
                 f"{peak / dense['peak_bytes']:.2f}" if peak else "n/a"]
        for _, speed in speeds:
            cells += [f"{speed(rec):,.0f}", f"{speed(rec) / speed(dense):.2f}"]
        table.add_row(*cells)
    Console(width=150).print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_model_dir()), help="dense checkpoint directory")
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="random-weight model instead of --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (default: float32 on CPU, the checkpoint's on GPU)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--recipes", type=lambda v: [x for x in v.split(",") if x], default=list(RECIPES),
                        help=f"comma-separated recipes to compare with dense (default: {','.join(RECIPES)})")
    parser.add_argument("--auto-sizes", type=lambda v: [float(x) for x in v.split(",")], default=[],
                        help="also `auto` at each of these size_ratio values (e.g. 0.3,0.4,0.6), rows 'auto 0.4' "
                             "(with --reuse: WORKDIR/auto/auto-0.4)")
    parser.add_argument("--no-dense-transposed", dest="dense_transposed", action="store_false",
                        help="skip the 'dense Wᵀ' control row (dense weights in the low-rank modules' memory layout)")
    parser.add_argument("--fuse-siblings", action="store_true",
                        help="add each svd recipe again, loaded with fuse_siblings=True (one A GEMM for q/k/v, gate/up)")
    parser.add_argument("--workdir", type=Path, help="keep the compressed checkpoints here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true",
                        help="benchmark checkpoints already in --workdir instead of compressing again")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256, help="prefill length (capped at the model's positions)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-rss", action="store_true", help="CPU: skip the peak-RSS subprocess per model")
    parser.add_argument("--json", type=Path, default=Path("bench-results/inference.json"))
    for hidden in ("--probe", "--probe-kind", "--probe-workload"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.torch_dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.probe:
        fields = json.loads(args.probe_workload)
        workload = Workload(**{**fields, "prefill_batches": tuple(fields["prefill_batches"]),
                               "decode_batches": tuple(fields["decode_batches"])})
        print(probe_rss(args.probe, args.probe_kind, args.torch_dtype, workload, args.threads))
        return

    from transformers import AutoConfig

    torch.set_num_threads(args.threads)
    device, gpu = args.device, args.device.startswith("cuda")
    config = SYNTHETIC[args.synthetic] if args.synthetic else AutoConfig.from_pretrained(args.model).to_dict()
    positions = config["max_position_embeddings"]
    workload = Workload(vocab_size=config["vocab_size"], new_tokens=args.new_tokens, seqlen=min(args.seqlen, positions))
    if workload.prompt_len + workload.new_tokens > positions:
        parser.error(f"prompt {workload.prompt_len} + --new-tokens > the model's {positions} positions")
    if args.reuse and not args.workdir:
        parser.error("--reuse needs --workdir")
    with tempfile.TemporaryDirectory() as folder:
        dense_dir, compressed, dtype = build_checkpoints(args, args.workdir or Path(folder), device)
        control = {"dense Wᵀ": (dense_dir, "dense-T")} if args.dense_transposed else {}
        paths = {"dense": (dense_dir, "dense"), **control, **{label: (path, "lrc") for label, path in compressed}}
        if args.fuse_siblings:  # the low-rank rows again, q/k/v and gate/up sharing one A GEMM
            paths.update({f"{label} fused": (path, "lrc-fused") for label, path in compressed if "svd" in label})
        models = {label: load(path, kind, dtype, device) for label, (path, kind) in paths.items()}
        records = measure(models, workload, device=device, repeats=args.repeats)
        del models
        rss_note = ("peak = weights + CUDA max_memory_allocated growth" if gpu else "peak RSS not measured (--no-rss)"
                    if args.no_rss else "peak RSS not measured (needs Linux's /proc/self/clear_refs)")
        if not gpu and not args.no_rss and Path("/proc/self/clear_refs").exists():
            for label, (path, kind) in paths.items():
                records[label]["peak_bytes"] = peak_rss_subprocess(path, kind, dtype, workload, args.threads)
            rss_note = "peak = weights + VmHWM growth, one subprocess per model"

    name = f"synthetic {args.synthetic} (random weights)" if args.synthetic else Path(args.model).name
    where = (torch.cuda.get_device_name(device) if gpu
             else f"{platform.processor() or platform.machine()} CPU") + f", {args.threads} threads"
    caption = (f"{where}; {str(dtype).removeprefix('torch.')}; tokens/s medians of {args.repeats}; decode = greedy "
               f"{workload.new_tokens} tokens after a {workload.prompt_len}-token prompt; {rss_note}; "
               f"torch {torch.__version__}; {date.today()}")
    print_table(records, f"{name}: inference vs dense (× = model / dense)", caption)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "model": name, "device": where, "threads": args.threads, "dtype": str(dtype), "date": str(date.today()),
        "torch": torch.__version__, "workload": asdict(workload), "repeats": args.repeats, "memory": rss_note,
        "calibration": {"nsamples": args.nsamples, "seqlen": args.calib_seqlen}, "recipes": args.recipes,
        "recipe_overrides": RECIPE_OVERRIDES, "records": records,
    }, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
