"""Truncated-SVD speed and error on a Llama layer set: lrc's batched solvers against a per-matrix torch.linalg.svd loop.

    .venv/bin/python scripts/bench_svd.py --shape demo --threads 1               # CPU, the shipped model's shapes
    .venv/bin/python scripts/bench_svd.py --shape demo --rank-fraction 0.125     # rank ≪ min(m, n): randomized's case
    .venv/bin/python scripts/bench_svd.py --shape 512,1408,64 --threads 1        # custom hidden,inter,kv_dim
    .venv/bin/python scripts/bench_svd.py --shape 7b --layers 4 --device cuda    # the issue's target (GPU)

A layer set is the 7 linears of a decoder layer (q, k, v, o, gate, up, down) × `--layers`, random weights with a
decaying spectrum σ_i ∝ (1 + i)^-0.5 built on the device, and one random Gram per layer input (q/k/v share one,
gate/up share one; tokens with correlated channels and a few outliers). Fixed seeds. Ranks: ⌊p·m·n/(m+n)⌋
(`--param-ratio`, compressor.budget.rank) or ⌊f·min(m, n)⌋ (`--rank-fraction`).

Plain block (time / its first row):  per-matrix fp32 torch.linalg.svd then truncate (what research repos do);
per-matrix truncated_svd(solver="full"); same-shape matrices stacked (within and across layers) into one call
with solver full / gram / randomized.  Whitened block (time / its first row): the SVD-LLM repository's way, per
matrix Cholesky of its own Gram + inverse + fp32 SVD of W·L (scripts/reference_svd_llm.py); lrc's svd-llm
decompose (one eigh per shared input, same-shape readers batched, gram solver), grouped like compressor.pipeline.apply.
Error: relative Frobenius error of the rank-r reconstruction over the Eckart–Young optimum (1.000 = optimal;
whitened: ‖(W−Ŵ)X‖ over its optimum), worst matrix of the set; the optimum's tail comes from an fp64 eigvalsh.
Each row's first call is untimed (warm-up; its output gives the errors), then `--repeats` rounds time every row
once (round-robin in this one process) and each row keeps its median. On CPU only ratios are printed (absolute
seconds depend on what else runs); the JSON keeps the seconds. On a busy CPU use `--threads 1`: OpenMP threads
fighting other processes for the cores made single repeats up to 30× slower.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from compressor.pipeline.apply import _errors as relative_errors
from compressor.linalg import truncated_svd
from compressor.methods.svd_llm import SVDLLMOptions, decompose as svd_llm_decompose
from compressor.budget.rank import rank_for_ratio
from compressor.pipeline.stats import Stats

sys.path.insert(0, str(Path(__file__).parent))
from reference_svd_llm import _cholesky  # noqa: E402

# hidden, intermediate, kv_heads·head_dim (k/v rows)
SHAPES = {"7b": (4096, 11008, 4096), "1b": (2048, 5632, 256), "demo": (256, 768, 128)}
SPECTRUM_DECAY = 0.5
OUTLIER_CHANNELS, OUTLIER_SCALE = 4, 30.0


def parse_shape(text: str) -> tuple[int, int, int]:
    if text in SHAPES:
        return SHAPES[text]
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--shape: one of {', '.join(SHAPES)} or hidden,inter,kv_dim")
    return parts


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _weight(m, n, device, seed):
    g, k = _generator(device, seed), min(m, n)
    Qm = torch.linalg.qr(torch.randn(m, k, device=device, generator=g)).Q
    Qn = torch.linalg.qr(torch.randn(n, k, device=device, generator=g)).Q
    s = (1 + torch.arange(k, device=device, dtype=torch.float32)).pow(-SPECTRUM_DECAY)
    return (Qm * s) @ Qn.T


def _gram(n, device, seed):
    """Σ x xᵀ over n + 512 tokens (per-channel scales, 16 shared factors, a few outlier channels): fp32, as fp64."""
    g = _generator(device, seed)
    tokens = n + 512
    scale = torch.exp(0.5 * torch.randn(n, device=device, generator=g))
    scale[torch.randperm(n, device=device, generator=g)[:OUTLIER_CHANNELS]] *= OUTLIER_SCALE
    X = torch.randn(tokens, n, device=device, generator=g) * scale
    X += torch.randn(tokens, 16, device=device, generator=g) @ torch.randn(16, n, device=device, generator=g)
    return (X.T @ X).double()


def layer_set(hidden, inter, kv, layers, device, seed=0):
    """(weights: name -> W fp32, inputs: name -> input name, grams: input name -> Gram fp64)."""
    weights, inputs, grams = {}, {}, {}
    for i in range(layers):
        shapes = {"q": (hidden, hidden, "attn_in"), "k": (kv, hidden, "attn_in"), "v": (kv, hidden, "attn_in"),
                  "o": (hidden, hidden, "o_in"), "gate": (inter, hidden, "mlp_in"), "up": (inter, hidden, "mlp_in"),
                  "down": (hidden, inter, "down_in")}
        for j, (name, (m, n, source)) in enumerate(shapes.items()):
            weights[f"{i}.{name}"] = _weight(m, n, device, seed + 100 * i + j)
            inputs[f"{i}.{name}"] = f"{i}.{source}"
            if f"{i}.{source}" not in grams:
                grams[f"{i}.{source}"] = _gram(n, device, seed + 100 * i + 50 + j)
    return weights, inputs, grams


def _stacked(weights, ranks):
    groups = {}
    for name, W in weights.items():
        groups.setdefault((*W.shape, ranks[name]), []).append(name)
    return groups


def _batched(weights, ranks, solver, **kw):
    out = {}
    for (_, _, rank), names in _stacked(weights, ranks).items():
        U, s, Vh = truncated_svd(torch.stack([weights[n] for n in names]), rank, solver, **kw)
        out.update({name: (U[i], s[i], Vh[i]) for i, name in enumerate(names)})
    return out


def _baseline(W, rank):
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :rank], s[:rank], Vh[:rank]


def _reference_whitened(W, gram, rank):
    """The SVD-LLM repository's per-matrix steps: Cholesky + inverse + fp32 SVD of W·L, Σ^½ split."""
    L, _ = _cholesky(gram)
    L_inv = torch.linalg.inv(L).float()
    U, s, Vh = torch.linalg.svd(W @ L.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return U[:, :rank] * root, (root[:, None] * Vh[:rank]) @ L_inv


def _lrc_whitened(weights, inputs, grams, ranks, whitening="eigh"):
    """compressor.pipeline.apply's grouping: per shared input one Stats (one eigh), same-shape readers in one call."""
    out = {}
    for source, gram in grams.items():
        stats = Stats(gram=gram)
        readers = {name: W for name, W in weights.items() if inputs[name] == source}
        for (_, _, rank), names in _stacked(readers, ranks).items():
            W = torch.stack([readers[n] for n in names])
            result = svd_llm_decompose(W, stats, SVDLLMOptions(rank=rank, svd_solver="gram", whitening=whitening), rank)
            out.update({name: (f.B, f.A) for name, f in zip(names, result.factors)})
    return out


def _optimal(M, rank):
    """Eckart–Young relative error √(Σ_{i>r} σ²/Σ σ²) from the fp64 eigenvalues of the smaller Gram."""
    M = M.double()
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    ev = torch.linalg.eigvalsh(G).clamp(min=0).flip(0)
    return math.sqrt((ev[rank:].sum() / ev.sum()).item())


def _error_ratios(block, out, weights, inputs, grams, optimal) -> dict[str, float]:
    ratios = {}
    for name, W in weights.items():
        if block == "plain":
            U, s, Vh = out[name]
            err, _ = relative_errors(W, (U.double() * s.double()) @ Vh.double(), None)
        else:
            B, A = out[name]
            _, err = relative_errors(W, B.double() @ A.double(), grams[inputs[name]])
        ratios[name] = err / optimal[name]
    return ratios


@torch.no_grad()
def build_rows(hidden, inter, kv, layers=1, device="cpu", *, param_ratio=0.8, rank_fraction=None, repeats=5,
               oversample=16, power_iters=2, seed=0) -> list[dict]:
    """Every row on the same layer set in this process. Each row's first call is untimed: it warms up and its
    output gives the errors; then `repeats` rounds time every row once each (round-robin, so background load hits
    all rows alike) and each row keeps the median."""
    weights, inputs, grams = layer_set(hidden, inter, kv, layers, device, seed)
    ranks = {name: max(1, math.floor(rank_fraction * min(W.shape))) if rank_fraction
             else rank_for_ratio(*W.shape, param_ratio) for name, W in weights.items()}
    chol = {source: torch.linalg.cholesky(g) for source, g in grams.items()}  # ‖ΔL‖ = ‖ΔX‖ for G = L Lᵀ
    optimal = {"plain": {name: _optimal(W, ranks[name]) for name, W in weights.items()},
               "whitened": {name: _optimal(W.double() @ chol[inputs[name]], ranks[name])
                            for name, W in weights.items()}}
    rand = dict(oversample=oversample, power_iters=power_iters)
    entries = [
        ("plain", "loop svd fp32 (baseline)", lambda: {n: _baseline(W, ranks[n]) for n, W in weights.items()}),
        ("plain", "loop truncated_svd full",
         lambda: {n: truncated_svd(W, ranks[n], "full") for n, W in weights.items()}),
        ("plain", "batched full", lambda: _batched(weights, ranks, "full")),
        ("plain", "batched gram (lrc)", lambda: _batched(weights, ranks, "gram")),
        ("plain", f"batched randomized p{oversample} q{power_iters}",
         lambda: _batched(weights, ranks, "randomized", **rand)),
        ("whitened", "loop chol+inv+svd (ref)",
         lambda: {n: _reference_whitened(W, grams[inputs[n]], ranks[n]) for n, W in weights.items()}),
        ("whitened", "lrc eigh/input + gram", lambda: _lrc_whitened(weights, inputs, grams, ranks)),
        ("whitened", "lrc cholesky/input + gram", lambda: _lrc_whitened(weights, inputs, grams, ranks, "cholesky")),
    ]
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    rows = []
    for block, label, fn in entries:
        errors = _error_ratios(block, fn(), weights, inputs, grams, optimal[block])
        rows.append({"block": block, "label": label, "times": [], "error_ratio_max": max(errors.values()),
                     "error_ratio_min": min(errors.values()), "error_ratios": errors})
    for _ in range(repeats):
        for row, (_, _, fn) in zip(rows, entries):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            row["times"].append(time.perf_counter() - start)
    base = {}
    for row in rows:
        row["seconds"] = statistics.median(row["times"])
        row["time_ratio"] = row["seconds"] / base.setdefault(row["block"], row["seconds"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=parse_shape, default="demo", help="7b, 1b, demo, or hidden,inter,kv_dim")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--param-ratio", type=float, default=0.8)
    parser.add_argument("--rank-fraction", type=float, default=None, help="rank = ⌊f·min(m, n)⌋ (overrides ratio)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--oversample", type=int, default=16)
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/svd.json"))
    args = parser.parse_args()
    hidden, inter, kv = args.shape
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = build_rows(hidden, inter, kv, args.layers, args.device, param_ratio=args.param_ratio,
                      rank_fraction=args.rank_fraction, repeats=args.repeats,
                      oversample=args.oversample, power_iters=args.power_iters)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    threads = torch.get_num_threads()
    where = gpu or f"{platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}"
    rank_rule = f"rank ⌊{args.rank_fraction}·min(m,n)⌋" if args.rank_fraction else f"param ratio {args.param_ratio}"
    table = Table(title=f"truncated SVD of {args.layers}× (q,k,v,o,gate,up,down), hidden {hidden}, inter {inter}, "
                        f"kv {kv}; {rank_rule}",
                  caption=f"base: first row of each block; err / optimal: worst matrix, 1.000 = Eckart–Young\n"
                          f"{where}; median of {args.repeats} after a warm-up; "
                          f"torch {torch.__version__}; {date.today()}")
    table.add_column("block")
    table.add_column("implementation")
    table.add_column("time / base", justify="right")
    table.add_column("speed-up", justify="right")
    if gpu:
        table.add_column("seconds", justify="right")
    table.add_column("err / optimal", justify="right")
    for row in rows:
        cells = [row["block"], row["label"], f"{row['time_ratio']:.2f}×", f"{1 / row['time_ratio']:.2f}×"]
        if gpu:
            cells.append(f"{row['seconds']:.3f}")
        table.add_row(*cells, f"{row['error_ratio_max']:.4f}")
    Console(width=max(Console().width, 100)).print(table)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "shape": {"hidden": hidden, "inter": inter, "kv_dim": kv, "layers": args.layers},
        "ranks": {"param_ratio": None if args.rank_fraction else args.param_ratio, "rank_fraction": args.rank_fraction},
        "randomized": {"oversample": args.oversample, "power_iters": args.power_iters},
        "device": where, "torch": torch.__version__, "date": str(date.today()),
        "repeats": args.repeats, "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
