"""The byte-budget allocator (compressor/budget/byte_budget.py) and `auto` under `allocation: global`: one encoding per
target chosen so that all targets together fit the budget with the least predicted error; predictions equal the
measured errors where they are exact; the greedy choice beats a uniform split of the same bytes."""

from __future__ import annotations

import itertools

import pytest
import torch

from compressor import registry
from compressor.budget.byte_budget import Choice, allocate_bytes, lower_hull
from compressor.errors import UserError
from compressor.pipeline.stats import Stats

pytestmark = pytest.mark.usefixtures("one_thread")
AUTO = registry.get("auto")


def brute_force(options: dict, budget: float) -> float:
    best = float("inf")
    for combo in itertools.product(*options.values()):
        if sum(c.bytes for c in combo) <= budget:
            best = min(best, sum(c.error for c in combo))
    return best


def test_lower_hull_keeps_only_points_some_exchange_rate_prefers():
    pts = [Choice("a", 0, 10.0), Choice("b", 10, 9.5), Choice("c", 10, 6.0), Choice("d", 20, 3.0),
           Choice("e", 30, 2.5), Choice("f", 40, 0.0), Choice("g", 50, 0.0)]
    assert [c.encoding for c in lower_hull(pts)] == ["a", "c", "d", "f"]  # b: same bytes, more error; e: above d–f


def test_greedy_is_optimal_on_convex_unit_steps():
    """Convex error curves with equal byte steps: taking the steepest step first is exactly optimal."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        options = {}
        for k in range(4):
            drops = torch.rand(4, generator=g).sort(descending=True).values  # falling gains: convex
            errors = (drops.flip(0).cumsum(0).flip(0)).tolist() + [0.0]
            options[f"m{k}"] = [Choice(i, 100 * i, e) for i, e in enumerate(errors)]
        for budget in (0, 300, 700, 1200, 1600):
            chosen = allocate_bytes(options, budget)
            assert sum(c.bytes for c in chosen.values()) <= budget
            assert sum(c.error for c in chosen.values()) == pytest.approx(brute_force(options, budget))


def test_leftover_bytes_go_to_points_off_the_hull():
    """x's cheap improvement lies above its hull; when no hull step fits, the remainder pass still takes it."""
    options = {"x": [Choice(0, 0, 10.0), Choice(1, 40, 9.5), Choice(2, 100, 0.0)],
               "y": [Choice(0, 0, 5.0), Choice(1, 200, 0.0)]}
    assert [c.encoding for c in lower_hull(options["x"])] == [0, 2]
    chosen = allocate_bytes(options, 40)
    assert (chosen["x"].encoding, chosen["y"].encoding) == (1, 0)
    for budget in (40, 99, 100, 150, 250, 300):
        chosen = allocate_bytes(options, budget)
        assert sum(c.error for c in chosen.values()) == brute_force(options, budget)


def test_a_budget_below_every_floor_is_one_line():
    with pytest.raises(UserError, match="below the smallest encoding"):
        allocate_bytes({"x": [Choice(0, 100, 1.0)], "y": [Choice(0, 100, 1.0)]}, 150)


def targets(seed=0, n=64):
    """Weights of different kinds sharing one input: a low-rank one (low rank wins), a noisy one (quantisation
    wins), and one where a few channels carry most of the output error."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(800, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1, n, dtype=torch.float64)
    stats = Stats(count=800, gram=X.T @ X)
    low = torch.randn(96, 5, generator=g) @ torch.randn(5, n, generator=g)
    noise = torch.randn(96, n, generator=g)
    mixed = torch.randn(96, n, generator=g) * torch.logspace(1, -1, 96)[:, None]
    return {"low": low, "noise": noise, "mixed": mixed}, stats


def measured_error(W, factors, gram) -> float:
    D = W.double() - factors.dense().double()
    return float(((D @ gram) * D).sum())


def test_predicted_errors_are_exact_for_truncations_and_gptq():
    weights, stats = targets()
    options = AUTO.Options(size_ratio=0.5, group_size=32, rank_step=4, dense_bits=16, speed="any")  # every encoding
    W = weights["mixed"]
    total = float(((W.double() @ stats.gram) * W.double()).sum())
    offered = AUTO.choices(W, stats, options)
    names = {c.encoding[0] for c in offered if c.encoding is not None}
    assert names == set(options.candidates)
    checked = 0
    for c in offered[1::3]:  # a spread of encodings and ranks
        built = AUTO.decompose(W[None], stats, options, c.encoding).factors[0]
        measured = measured_error(W, built, stats.gram)
        exact = "int" not in c.encoding[0]  # quantised factors' noise is estimated (κ × kept energy)
        tolerance = dict(rel=1e-6, abs=1e-9 * total) if exact else dict(rel=0.35, abs=1e-4 * total)
        assert c.error == pytest.approx(measured, **tolerance)
        if exact:
            assert c.predicted == pytest.approx((measured / total) ** 0.5, rel=1e-6)
        checked += 1
    assert checked > 15


def test_global_choice_beats_a_uniform_split_of_the_same_bytes():
    weights, stats = targets()
    options = AUTO.Options(size_ratio=0.3, group_size=32, rank_step=4, dense_bits=16)
    offered = {name: AUTO.choices(W, stats, options) for name, W in weights.items()}
    budget = 0.3 * sum(W.numel() * 2 for W in weights.values())
    chosen = allocate_bytes(offered, budget)
    assert sum(c.bytes for c in chosen.values()) <= budget
    global_error = sum(measured_error(W, AUTO.decompose(W[None], stats, options, chosen[name].encoding).factors[0],
                                      stats.gram) for name, W in weights.items())
    uniform_error = sum(measured_error(W, AUTO.decompose(W[None], stats, options).factors[0], stats.gram)
                        for W in weights.values())
    assert global_error < 0.8 * uniform_error
    assert len({chosen[name].bytes for name in weights}) == 3  # the bytes really move between targets


def test_global_auto_on_a_model_fits_the_total_and_predicts_what_it_measures(tmp_path):
    """On dense inputs the planning pass sees exactly the statistics the decompositions use, so each target's
    predicted error is its measured one (the quantised factors' estimate aside); bytes move between targets and
    the total, from the tensors written, fits the budget."""
    from tests.test_bytes import compress_and_save, tensor_bytes

    result, report = compress_and_save("auto", tmp_path / "out", ["size_ratio=0.35", "allocation=global",
                                                                  "rank_step=4"])
    t = report["totals"]
    assert 0.3 < t["size_ratio"] <= 0.35
    assert t["target_bytes_after"] == sum(v for k, v in tensor_bytes(tmp_path / "out").items()
                                          if any(k.startswith(m["name"] + ".") for m in report["modules"]))
    assert len({round(m["size_ratio"], 2) for m in report["modules"]}) > 2  # not one ratio everywhere
    exact = [m for m in report["modules"] if m["compressed"] and m["spec"]["kind"] != "lowrank_quant"]
    assert exact
    for m in exact:
        assert m["predicted_rel_output_error"] == pytest.approx(m["rel_output_error"], rel=1e-4, abs=1e-7), m["name"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "allocation: global" in md and "| encoding | targets | bytes after |" in md
