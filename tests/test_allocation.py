"""Rank allocation (recipe `allocation: energy | global`): budget, never growing a layer, optimality; which
spectra `global` may compare raw; `weight: loss` (output gradients from the Fisher pass)."""

import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from compressor import api, registry
from compressor.budget.allocation import allocate_ranks
from compressor.errors import UserError
from compressor.pipeline.fisher import FisherDiag, collect_fisher
from compressor.budget.rank import allocate_energy, allocate_global, max_rank, predicted_relative_error
from compressor.recipe import load_recipe
from compressor.pipeline.stats import Stats

pytestmark = pytest.mark.usefixtures("one_thread")


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
    with pytest.raises(UserError, match="no rank to allocate"):
        api.compress(tiny_llama(), load_recipe("rtn-4bit", ["allocation=global"]),
                     batches=torch.randint(0, 256, (2, 16)))


# ---------------------------------------------------------------------------------------------------------------
# which spectra `global` may compare across modules


def test_every_spectrum_declares_its_units():
    for name in registry.names():
        method = registry.get(name)
        assert (method.spectrum is None) == (method.spectrum_units is None), name
    units = {name: registry.get(name).spectrum_units for name in ("svd", "svd-llm", "asvd", "fwsvd")}
    assert units == {"svd": "weight", "svd-llm": "output", "asvd": "scaled", "fwsvd": "scaled"}


@pytest.mark.parametrize("recipe", ["asvd-20", "fwsvd-20"])
def test_raw_global_allocation_of_per_module_scaled_spectra_is_refused_before_calibration(recipe):
    # No batches and no tokenizer: any calibration work would fail differently (ValueError), so the UserError
    # proves the refusal comes first.
    for weight, says in (("raw", "scales each module's spectrum arbitrarily"), ("loss", "needs a spectrum of output")):
        overrides = ["allocation=global", f"allocation_options.weight={weight}"]
        with pytest.raises(UserError) as err:
            api.compress(tiny_llama(), load_recipe(recipe, overrides))
        message = str(err.value)
        assert says in message and "\n" not in message
        assert f"'{recipe.split('-')[0]}'" in message and "allocation_options.weight: relative" in message
    with pytest.raises(UserError, match="'svd' gives a weight error"):
        api.compress(tiny_llama(), load_recipe("svd-20", ["allocation=global", "allocation_options.weight=loss"]))


@pytest.mark.parametrize("recipe", ["asvd-20", "fwsvd-20"])
def test_relative_global_allocation_of_scaled_spectra_runs(recipe):
    batches = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    overrides = ["allocation=global", "allocation_options.weight=relative"]
    result = api.compress(tiny_llama(), load_recipe(recipe, overrides), batches=batches)
    assert sum(r.params_after for r in result.modules) <= 0.8 * sum(r.params_before for r in result.modules)
    assert len({r.spec["rank"] for r in result.modules if r.compressed}) > 3


# ---------------------------------------------------------------------------------------------------------------
# `weight: loss`


def test_output_gradient_statistic_equals_whole_model_autograd():
    model, reference = tiny_llama(), tiny_llama()
    batches = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(2))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"]
    fisher = collect_fisher(model, batches, names, batch_size=2)  # chunks of 2, 2 and 1 windows

    # Reference: HF's own loss per chunk, autograd to each module's output y, Σ_t (∂L_c/∂y_t)² per channel.
    outputs = {}
    hooks = [reference.get_submodule(n).register_forward_hook(
        lambda module, args, out, n=n: outputs.__setitem__(n, out)) for n in names]
    expected = {n: 0 for n in names}
    for s in range(0, 5, 2):
        loss = reference(input_ids=batches[s : s + 2], labels=batches[s : s + 2], use_cache=False).loss
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
        for n, g in zip(names, grads):
            expected[n] = expected[n] + g.double().square().flatten(0, -2).sum(0)
    for hook in hooks:
        hook.remove()
    for n in names:
        got = fisher[n].output_grad_sq
        assert got.dtype == torch.float64 and got.shape == (reference.get_submodule(n).out_features,)
        assert torch.allclose(got, expected[n], rtol=1e-5, atol=0)
        assert expected[n].min() > 0
    # The existing weight statistics are still the squared weight gradients' row sums (unchanged by the new fold).
    W = reference.get_submodule(names[2]).weight
    sq = sum(torch.autograd.grad(reference(input_ids=batches[s : s + 2], labels=batches[s : s + 2],
                                           use_cache=False).loss, W)[0].double().square() for s in range(0, 5, 2))
    assert torch.allclose(fisher[names[2]].out, sq.sum(1), rtol=1e-5, atol=0)


def two_module_case(h: dict[str, torch.Tensor]):
    """Three targets; a and b have the same weight and inputs, so only the output gradients h tell them apart."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 32, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 32, dtype=torch.float64)
    stats = Stats(count=400, gram=x.T @ x)
    shared = torch.randn(40, 32, generator=g) * torch.logspace(0, -1.5, 32)
    targets = {}
    for name, weight in (("a", shared), ("b", shared), ("c", torch.randn(24, 32, generator=g))):
        targets[name] = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        targets[name].weight.data.copy_(weight)
    statistics = SimpleNamespace(layers=[({n: [n] for n in targets}, {n: copy.deepcopy(stats) for n in targets})])
    fisher = {n: FisherDiag(out=None, in_=None, output_grad_sq=h[n]) for n in targets}
    return [targets], statistics, fisher


def test_loss_weight_spends_exactly_the_budget_and_follows_the_output_gradients():
    h = {"a": torch.full((40,), 1.0, dtype=torch.float64), "b": torch.full((40,), 30.0, dtype=torch.float64),
         "c": torch.full((24,), 3.0, dtype=torch.float64)}
    layer_targets, statistics, fisher = two_module_case(h)
    method = registry.get("svd-llm")
    loss = load_recipe("svd-llm-20", ["allocation=global", "allocation_options.weight=loss"])
    raw = load_recipe("svd-llm-20", ["allocation=global", "allocation_options.weight=raw"])
    options = loss.method_options()
    by_loss = {n: r for n, (r, _) in allocate_ranks(loss, method, options, layer_targets, statistics, fisher).items()}
    by_raw = {n: r for n, (r, _) in allocate_ranks(raw, method, options, layer_targets, statistics).items()}

    shapes = {n: tuple(m.weight.shape) for n, m in layer_targets[0].items()}
    budget = sum(int(0.8 * m * n / (m + n)) * (m + n) for m, n in shapes.values())  # what uniform stores
    spent = sum(by_loss[n] * sum(shapes[n]) for n in shapes)
    assert spent <= budget
    for n, (m, k) in shapes.items():  # no further singular value of any module fits
        assert by_loss[n] == max_rank(m, k) or spent + m + k > budget
    assert abs(by_raw["a"] - by_raw["b"]) <= 1  # same weight, same inputs: raw cannot tell them apart (ties)
    assert by_loss["b"] > by_raw["b"] and by_loss["a"] < by_raw["a"]  # the loss can
    # Flat h per module: the loss weight is the raw output error times h̄, exactly.
    spectra = {n: method.spectrum(m.weight.detach()[None], statistics.layers[0][1][n], options)[0] * h[n][0].sqrt()
               for n, m in layer_targets[0].items()}
    assert by_loss == allocate_global(spectra, shapes, budget, weight="raw")
    with pytest.raises(ValueError, match="needs the Fisher pass"):
        allocate_ranks(loss, method, options, layer_targets, statistics)


def test_loss_weighted_global_allocation_end_to_end():
    batches = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    recipe = load_recipe("svd-llm-20", ["allocation=global", "allocation_options.weight=loss"])
    result = api.compress(tiny_llama(), recipe, batches=batches)
    raw = api.compress(tiny_llama(), load_recipe("svd-llm-20", ["allocation=global", "allocation_options.weight=raw"]),
                       batches=batches)
    assert "fisher" in result.timings and "allocation" in result.timings
    before = sum(r.params_before for r in result.modules)
    assert sum(r.params_after for r in result.modules) <= 0.8 * before
    ranks = {r.name: r.spec["rank"] for r in result.modules if r.compressed}
    assert len(ranks) == 14 and ranks != {r.name: r.spec["rank"] for r in raw.modules if r.compressed}
    for r in result.modules:  # the predictions stay the method's own (unweighted) output errors
        if ".layers.0." in r.name:
            assert r.rel_output_error == pytest.approx(r.predicted_rel_output_error, rel=1e-3, abs=1e-6)
    dense = load_recipe("svd-llm-20", ["allocation=global", "allocation_options.weight=loss", "sequential.inputs=dense"])
    stats = api.collect_statistics(tiny_llama(), batches, [dense])
    with pytest.raises(ValueError, match="needs calibration `batches`"):
        api.compress(tiny_llama(), dense, statistics=stats)


# ---------------------------------------------------------------------------------------------------------------
# the default weight (issue 24, item 3): raw output errors grow with depth and ruined SmolLM2 (tests/test_smollm2.py)


@pytest.mark.parametrize("recipe,expected", [("svd-llm-40", "loss"), ("auto", "loss"), ("svd-20", "relative"),
                                             ("asvd-20", "relative"), ("fwsvd-20", "relative")])
def test_unset_weight_is_loss_for_output_errors_and_relative_otherwise(recipe, expected):
    from compressor.budget.allocation import allocation_weight

    recipe = load_recipe(recipe, ["allocation=global", "allocation_options.weight=null"])  # auto's sets loss
    assert recipe.allocation_options.weight is None  # unset: the method decides
    assert allocation_weight(recipe) == expected
    assert allocation_weight(load_recipe("svd-llm-40", ["allocation=energy"])) is None  # compares nothing
    explicit = load_recipe("svd-llm-40", ["allocation=global", "allocation_options.weight=raw"])
    assert allocation_weight(explicit) == "raw"  # asked for: kept


def test_recipes_show_writes_the_default_weight_out():
    from tests.helpers import run

    for name, weight in (("svd-llm-40", "loss"), ("svd-20", "relative")):
        shown = run("recipes", "show", name)
        assert shown.exit_code == 0 and f"  weight: {weight}\n" in shown.output
        assert "weight: raw" not in shown.output and "weight: null" not in shown.output


def test_default_global_runs_the_fisher_pass_and_the_report_names_the_weight(tmp_path, capsys):
    from tests.test_bytes import compress_and_save

    result, report = compress_and_save("svd-llm-20", tmp_path / "out", ["allocation=global"])
    assert "fisher" in result.timings and report["allocation_weight"] == "loss"
    assert "allocation: global (errors weighted loss)" in (tmp_path / "out" / "report.md").read_text()
    assert "warning" not in capsys.readouterr().err


def test_explicit_raw_over_output_errors_runs_with_one_warning_line(capsys):
    batches = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    recipe = load_recipe("svd-llm-20", ["allocation=global", "allocation_options.weight=raw"])
    result = api.compress(tiny_llama(), recipe, batches=batches)
    assert "fisher" not in result.timings  # raw: no Fisher pass
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "weight 'raw'" in lines[0] and "residual stream" in lines[0], err
    # relative (any method) and raw over weight errors (svd) say nothing
    api.compress(tiny_llama(), load_recipe("svd-llm-20", ["allocation=global", "allocation_options.weight=relative"]),
                 batches=batches)
    api.compress(tiny_llama(), load_recipe("svd-20", ["allocation=global", "allocation_options.weight=raw"]),
                 batches=batches)
    assert "warning" not in capsys.readouterr().err


def test_explicit_raw_byte_budget_warns_before_any_work(capsys):
    from compressor.budget.allocation import validate_allocation

    auto = registry.get("auto")
    validate_allocation(load_recipe("auto", ["allocation_options.weight=raw"]), auto)
    assert capsys.readouterr().err.startswith("warning: allocation 'global' with weight 'raw'")
    validate_allocation(load_recipe("auto"), auto)
    validate_allocation(load_recipe("auto", ["allocation_options.weight=raw"]), auto, warn=False)
    assert capsys.readouterr().err == ""
