"""Rank allocation (recipe `allocation: energy | global`): budget, never growing a layer, optimality."""

import copy
import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compressor import api
from compressor.rank import allocate_energy, allocate_global, max_rank, predicted_relative_error
from compressor.recipe import load_recipe


def spectra_and_shapes(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (12, 8), "b": (10, 10), "c": (16, 6)}
    spectra = {k: torch.rand(min(s), generator=g, dtype=torch.float64).sort(descending=True).values * (i + 1)
               for i, (k, s) in enumerate(shapes.items())}
    return spectra, shapes


def objective(spectra, ranks, weight="relative"):
    total = 0.0
    for k, s in spectra.items():
        e = s.pow(2)
        w = 1 / e.sum() if weight == "relative" else 1.0
        total += float(w * e[ranks[k]:].sum())
    return total


@pytest.mark.parametrize("weight", ["relative", "raw"])
@pytest.mark.parametrize("budget", [70, 90, 130])
def test_global_allocation_matches_brute_force_and_respects_the_budget(weight, budget):
    spectra, shapes = spectra_and_shapes()
    ranks = allocate_global(spectra, shapes, budget, weight=weight)
    cost = lambda r: sum(r[k] * sum(shapes[k]) for k in r)  # noqa: E731
    assert cost(ranks) <= budget
    assert all(1 <= ranks[k] <= max_rank(*shapes[k]) for k in ranks)  # never grows a layer
    best = min(
        (dict(zip(shapes, rs)) for rs in itertools.product(*(range(1, max_rank(*s) + 1) for s in shapes.values()))
         if cost(dict(zip(shapes, rs))) <= budget),
        key=lambda r: objective(spectra, r, weight),
    )
    # Greedy is optimal up to the last item at the budget edge: within one item's error of the optimum.
    last_item = max(float(s.pow(2).max() / (s.pow(2).sum() if weight == "relative" else 1)) for s in spectra.values())
    assert objective(spectra, ranks, weight) <= objective(spectra, best, weight) + last_item
    assert objective(spectra, ranks, weight) >= objective(spectra, best, weight) - 1e-12


def test_global_allocation_spends_where_the_error_is():
    shapes = {"flat": (20, 20), "steep": (20, 20)}
    spectra = {"flat": torch.ones(20, dtype=torch.float64),
               "steep": torch.logspace(0, -6, 20, dtype=torch.float64)}
    ranks = allocate_global(spectra, shapes, budget=10 * 40, weight="raw")
    assert ranks["flat"] > ranks["steep"]
    with pytest.raises(ValueError):
        allocate_global(spectra, shapes, budget=10, min_rank=1)


def test_energy_allocation_keeps_the_requested_energy_or_stays_dense():
    shapes = {"x": (40, 40), "y": (40, 40)}
    spectra = {"x": torch.logspace(0, -3, 40, dtype=torch.float64), "y": torch.ones(40, dtype=torch.float64)}
    ranks = allocate_energy(spectra, shapes, energy=0.9)
    e = spectra["x"].pow(2)
    r = ranks["x"]
    assert e[:r].sum() / e.sum() >= 0.9 > e[: r - 1].sum() / e.sum()
    assert ranks["y"] is None  # 90% of a flat spectrum needs rank 36 > max_rank 19: kept dense
    assert predicted_relative_error(spectra["x"], r) == pytest.approx(float((e[r:].sum() / e.sum()).sqrt()))


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).eval()


def test_global_allocation_in_the_pipeline_respects_the_recipe_budget_and_predicts_layer0_errors():
    model = tiny_llama()
    batches = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    uniform = api.compress(copy.deepcopy(model), load_recipe("svd-llm-20"), batches=batches)
    result = api.compress(model, load_recipe("svd-llm-20", ["allocation=global"]), batches=batches)
    before = sum(r.params_before for r in result.modules)
    after = sum(r.params_after for r in result.modules)
    assert after <= 0.8 * before  # the recipe's budget, spent globally
    assert after >= sum(r.params_after for r in uniform.modules)  # and not less than uniform's floors spend
    ranks = [r.spec["rank"] for r in result.modules if r.compressed]
    assert len(set(ranks)) > 3  # ranks really differ across modules
    for r in result.modules:
        m, n = r.shape
        assert r.spec["rank"] * (m + n) < m * n
        if ".layers.0." in r.name:  # layer 0 sees the dense inputs: the prediction is exact
            assert r.rel_output_error == pytest.approx(r.predicted_rel_output_error, rel=1e-3, abs=1e-6)


def test_allocation_refuses_methods_without_a_rank():
    from compressor.errors import UserError

    with pytest.raises(UserError, match="no rank to allocate"):
        api.compress(tiny_llama(), load_recipe("rtn-4bit", ["allocation=global"]),
                     batches=torch.randint(0, 256, (2, 16)))
