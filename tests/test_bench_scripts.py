"""scripts/bench_svd.py's rows on tiny shapes: every solver reaches (or, randomized, stays near) the optimum.
Timings are not checked here: performance claims live in the script's output only."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_svd import build_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("options", [dict(param_ratio=0.8), dict(rank_fraction=0.125)])
def test_bench_svd_rows_are_optimal_except_randomized(options):
    rows = build_rows(32, 80, 16, layers=2, repeats=1, **options)
    assert [r["block"] for r in rows] == ["plain"] * 5 + ["whitened"] * 3
    for row in rows:
        assert row["error_ratio_min"] >= 0.999, row["label"]  # nothing beats Eckart–Young
        if "randomized" not in row["label"]:
            assert row["error_ratio_max"] <= 1.0001, row["label"]
        assert len(row["error_ratios"]) == 14 and row["seconds"] > 0
