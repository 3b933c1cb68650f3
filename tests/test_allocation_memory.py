"""Rank allocation (`energy` / `global`) with dense inputs holds one decoder layer's statistics at a time: the
planning pass keeps only spectra and the layer pass computes each layer's statistics again (at 7B, keeping
every layer's fp64 Grams would hold ~44 GB). The result equals the one from statistics kept for every layer."""

import copy
import gc
import weakref

import pytest
import torch

from compressor import api
from compressor.pipeline import stats as stats_module
from compressor.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _watch_grams(monkeypatch):
    """Patch the collector so every Gram it creates is watched; returns a dict whose "peak" is the most Grams
    alive at once (counted after each accumulation, garbage collected first)."""
    alive, seen = [], {"peak": 0}
    original = stats_module.StatsCollector._accumulate

    def accumulate(self, name, x):
        had = self.stats.get(name)
        original(self, name, x)
        if had is None:
            alive.append(weakref.ref(self.stats[name].gram))
        gc.collect()
        seen["peak"] = max(seen["peak"], sum(ref() is not None for ref in alive))

    monkeypatch.setattr(stats_module.StatsCollector, "_accumulate", accumulate)
    return seen


@pytest.mark.parametrize("allocation", ["energy", "global"])
def test_dense_input_allocation_holds_one_layers_statistics_and_matches_kept_statistics(
        monkeypatch, tiny_model, calib_ids, allocation):
    overrides = [f"allocation={allocation}", "sequential.inputs=dense", "allocation_options.weight=relative"]
    if allocation == "energy":
        overrides.append("allocation_options.energy=0.9")
    recipe = load_recipe("svd-llm-20", overrides)
    batches = calib_ids(4, 16)
    model = tiny_model("llama", correlated=True)
    reference = copy.deepcopy(model)

    seen = _watch_grams(monkeypatch)
    result = api.compress(model, recipe, batches=batches)
    # A layer of the tiny llama has 4 inputs (q/k/v, o, gate/up, down): one Gram each. Keeping every layer's
    # statistics held 8 (both layers) at the end of the first pass.
    assert seen["peak"] == 4

    monkeypatch.undo()
    kept = api.collect_statistics(reference, batches, [recipe])  # every layer's statistics, held at once
    expected = api.compress(reference, recipe, statistics=kept)
    ranks = {r.name: r.spec and r.spec["rank"] for r in result.modules}
    assert ranks == {r.name: r.spec and r.spec["rank"] for r in expected.modules}
    assert len(set(ranks.values())) > 1
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in got:
        assert torch.equal(got[key], want[key]), key


def test_a_layer_decomposes_its_widest_input_first_and_drops_each_inputs_statistics_when_done(
        monkeypatch, tiny_model, calib_ids):
    """down_proj's n×n Gram (0.64 GB fp64 at Qwen2.5-1.5B's 8960) is freed before gate/up's solves allocate
    theirs: while each group is decomposed, no Gram wider than its own input is alive."""
    from compressor import registry

    method = registry.get("svd-llm")
    original, seen = method.decompose, []
    grams = []

    def decompose(W, stats, options, rank):
        gc.collect()
        seen.append((W.shape[-1], sorted(ref().shape[0] for ref in grams if ref() is not None)))
        return original(W, stats, options, rank)

    import dataclasses

    patched, get = dataclasses.replace(method, decompose=decompose), registry.get
    monkeypatch.setattr(registry, "get", lambda name: patched if name == "svd-llm" else get(name))
    original_accumulate = stats_module.StatsCollector._accumulate

    def accumulate(self, name, x):
        had = self.stats.get(name)
        original_accumulate(self, name, x)
        if had is None:
            grams.append(weakref.ref(self.stats[name].gram))

    monkeypatch.setattr(stats_module.StatsCollector, "_accumulate", accumulate)
    model = tiny_model("llama")
    api.compress(model, "svd-llm-20", batches=calib_ids(4, 16))
    widths = [width for width, _ in seen]
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    per_layer = len(widths) // model.config.num_hidden_layers  # q, k/v (another shape), o, gate/up, down
    assert widths == ([intermediate] + [hidden] * (per_layer - 1)) * model.config.num_hidden_layers
    for width, alive in seen:
        assert max(alive) <= width, (width, alive)
