"""lowrank-sparse's alternation: a full SVD per round against the warm-started subspace iteration (the default).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_lowrank_sparse.py                      # 7B gate_proj shape
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_lowrank_sparse.py --m 1024 --n 2816 --rounds 40

One synthetic target (low rank + noise, decaying input channel scales, like bench_scale's layers) at recipe
lowrank-sparse-50's budget (size_ratio 0.5, rank_fraction 0.3, k per row), `--rounds` rounds of each solver in
the same process, one after the other: seconds per round and the objective ‖W' − L − S‖_F after the last round.
Both are printed as ratios (subspace / full); absolute seconds mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from compressor import registry
from compressor.methods.lowrank_sparse import alternate, budget


def target(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = min(256, m, n)
    W = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank ** 0.5
    W += 0.3 * torch.randn(m, n, generator=g)
    return (W * torch.logspace(0, -1, n))[None]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=11008, help="rows (default: 7B gate_proj)")
    p.add_argument("--n", type=int, default=4096, help="columns")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per solver (the recipe runs 40)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    W = target(args.m, args.n)
    r, k = budget(args.m, args.n, registry.get("lowrank-sparse").Options(size_ratio=0.5))
    print(f"target {args.m}×{args.n}, rank {r}, {k // args.m} sparse entries per row, {args.rounds} rounds, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    rows = {}
    for svd in ("full", "subspace"):
        t0 = time.perf_counter()
        *_, objective = alternate(W, r, k, args.rounds, True, record=True, svd=svd)
        seconds = time.perf_counter() - t0
        rows[svd] = (seconds / args.rounds, objective[-1].item())
        print(f"{svd:>8}: {seconds / args.rounds:8.2f} s a round, objective {objective[-1].item():.6g}")
    (full_s, full_obj), (sub_s, sub_obj) = rows["full"], rows["subspace"]
    print(f"subspace / full: seconds {sub_s / full_s:.3f} ({full_s / sub_s:.1f}× faster), "
          f"objective {sub_obj / full_obj:.5f}")


if __name__ == "__main__":
    main()
