"""The runner's quality options (issue 12): group-sequential calibration, attention-sink skipping, block refinement."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor import api, registry
from compressor.pipeline.apply import compress_layer
from compressor.recipe import load_recipe
from compressor.pipeline.refine import refine_block
from compressor.pipeline.sequential import capture_layer_inputs, run_sequential
from compressor.pipeline.stats import StatsCollector
from compressor.pipeline.targets import find_decoder_layers, select_targets

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = ["calibration.nsamples=6", "calibration.seqlen=24"]


def _compress(model, ids, *overrides, recipe="svd-llm-40"):
    return api.compress(model, load_recipe(recipe, CALIB + list(overrides)), batches=ids)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("targets", ['targets=["*q_proj", "*k_proj", "*v_proj"]', 'targets=["*down_proj"]'])
def test_group_sequential_equals_layer_sequential_when_one_group_is_targeted(tiny_model, calib_ids, targets):
    ids = calib_ids(6, 24)
    a, b = tiny_model("llama", correlated=True), tiny_model("llama", correlated=True)
    _compress(a, ids, targets)
    _compress(b, ids, targets, "sequential.granularity=group")
    _assert_same_state(_state(a), _state(b))


def _grams_by_granularity(model, ids, granularity):
    """{module name: Gram its statistics used} when compressing every target with svd-llm at 40 % removed."""
    method = registry.get("svd-llm")
    options = method.Options(param_ratio=0.6)
    layer_targets = select_targets(model, ["*"], [])
    grams = {}

    def on_layer(index, collector):
        for name in collector.modules:
            grams[name] = collector.for_module(name).gram.clone()
        compress_layer(model, layer_targets[index], collector.groups(), collector.stats, method, options)

    run_sequential(model, ids, layer_targets, frozenset({"gram"}), on_layer, batch_size=3, granularity=granularity)
    return grams


def _input_grams(model, ids, names):
    """Gram of each named module's input in `model` as it is now (one forward, hooks)."""
    grams, handles = {}, []
    for name in names:
        def hook(module, args, output, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return grams


def test_group_sequential_calibrates_each_group_on_the_compressed_earlier_groups(tiny_model, calib_ids):
    """In layer 0 (whose inputs are the embeddings either way) every target's Gram under `group` is the Gram of
    its input in the finished compressed model: o_proj sees the compressed q/k/v, the MLP the compressed
    attention, down_proj the compressed gate/up. Under `layer` those differ (they are the dense layer's)."""
    ids = calib_ids(6, 24)
    names = [f"model.layers.0.{n}" for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    for granularity, expect_equal in (("group", True), ("layer", False)):
        model = tiny_model("llama", correlated=True)
        used = _grams_by_granularity(model, ids, granularity)
        actual = _input_grams(model, ids, names)
        for name in names:
            gap = float((used[name] - actual[name]).abs().max() / actual[name].abs().max())
            assert (gap < 1e-5) == expect_equal, (granularity, name, gap)


def test_sink_skipping_leaves_exactly_the_first_positions_out(tiny_model, calib_ids):
    model = tiny_model("llama", correlated=True)
    ids = calib_ids(4, 16)
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    handle = q.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().double()))
    collector = StatsCollector({"q": q}, frozenset({"gram", "abs_mean"}), skip_first=3)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    collector.remove()
    handle.remove()
    x = seen[0][:, 3:].reshape(-1, seen[0].shape[-1])
    stats = collector.for_module("q")
    assert stats.count == 4 * 13
    exact = x.T @ x  # the collector forms products in fp32 (summed in fp64)
    torch.testing.assert_close(stats.gram, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0), rtol=1e-6, atol=0)
    full = seen[0].reshape(-1, seen[0].shape[-1])
    assert (stats.gram - full.T @ full).abs().max() > 1e-3  # the first positions did count before


def test_sink_skipping_reaches_the_statistics_of_a_compress_run(tiny_model, calib_ids):
    ids = calib_ids(6, 24)
    a, b = tiny_model("llama", correlated=True), tiny_model("llama", correlated=True)
    _compress(a, ids)
    _compress(b, ids, "calibration.skip_first=2")
    assert any((a.state_dict()[k] - b.state_dict()[k]).abs().max() > 1e-4 for k in a.state_dict())


def _layer0_setup(tiny_model, calib_ids):
    """Layer 0 of a tiny Llama with its targets compressed by svd-llm (40 % removed), its recorded calls and
    the dense layer's outputs on them."""
    model = tiny_model("llama", correlated=True)
    ids = calib_ids(6, 24)
    _, layers = find_decoder_layers(model)
    calls = capture_layer_inputs(model, layers, ids, device="cpu", offload="cpu", batch_size=3)
    layer = layers[0]
    with torch.no_grad():
        dense = [layer(*args, **kwargs)[0] if isinstance(layer(*args, **kwargs), tuple) else layer(*args, **kwargs)
                 for args, kwargs in calls]
    targets = select_targets(model, ["*"], [])[0]
    method = registry.get("svd-llm")
    collector = StatsCollector(targets, frozenset({"gram"}))
    with torch.no_grad():
        for args, kwargs in calls:
            collector.start_batch()
            layer(*args, **kwargs)
    collector.remove()
    compress_layer(model, targets, collector.groups(), collector.stats, method, method.Options(param_ratio=0.6))
    modules = [model.get_submodule(n) for n in targets]
    return layer, modules, calls, [d if d.dim() == 3 else d[0] for d in dense]


def _refine(layer, modules, calls, targets, **kw):
    options = dict(epochs=3, lr=1e-3, batch_size=2, seed=0, skip_first=0, device="cpu", offload="cpu")
    return refine_block(layer, modules, calls, targets, **{**options, **kw})


def test_refinement_with_zero_epochs_changes_nothing(tiny_model, calib_ids):
    layer, modules, calls, targets = _layer0_setup(tiny_model, calib_ids)
    before = _state(layer)
    report, outs = _refine(layer, modules, calls, targets, epochs=0)
    _assert_same_state(before, _state(layer))
    assert report.loss_after == report.loss_before and report.steps == 0
    with torch.no_grad():
        for (args, kwargs), y in zip(calls, outs):
            out = layer(*args, **kwargs)
            torch.testing.assert_close(y, out[0] if isinstance(out, tuple) else out, rtol=0, atol=0)


def test_refinement_lowers_the_block_loss_it_reports_and_is_deterministic(tiny_model, calib_ids):
    layer, modules, calls, targets = _layer0_setup(tiny_model, calib_ids)
    start = _state(layer)
    report, outs = _refine(layer, modules, calls, targets)
    assert report.steps == 3 * 4 and not report.reverted  # 2 calls of 3 windows -> pieces of 2 + 1 per call
    assert report.loss_after < 0.9 * report.loss_before
    # The reported loss is the layer's relative output error², recomputed here from its returned outputs.
    err = sum(float((y - t).double().pow(2).sum()) for y, t in zip(outs, targets))
    norm = sum(float(t.double().pow(2).sum()) for t in targets)
    assert err / norm == pytest.approx(report.loss_after, rel=1e-6)
    # Only the compressed modules' factors moved; the norms and everything else are as they were.
    refined = {k for k, v in _state(layer).items() if not torch.equal(v, start[k])}
    assert refined and all(k.endswith(("A.weight", "B.weight")) for k in refined)
    assert all(p.requires_grad for p in layer.parameters())  # flags restored
    # Same seed, same start: the same factors.
    again = _state(layer)
    layer.load_state_dict(start)
    _refine(layer, modules, calls, targets)
    _assert_same_state(again, _state(layer))


def test_a_step_that_makes_the_block_worse_is_reverted(tiny_model, calib_ids):
    layer, modules, calls, targets = _layer0_setup(tiny_model, calib_ids)
    start = _state(layer)
    report, _ = _refine(layer, modules, calls, targets, lr=10.0)
    assert report.reverted and report.loss_after == pytest.approx(report.loss_before, rel=1e-9)
    _assert_same_state(start, _state(layer))


def test_refinement_through_compress_reports_each_layer_and_improves_the_model(tiny_model, calib_ids):
    ids = calib_ids(6, 24)
    dense = tiny_model("llama", correlated=True)
    with torch.no_grad():
        reference = dense(ids).logits
    errors = {}
    for name, overrides in (("plain", []), ("refined", ["refine.epochs=3", "refine.lr=1e-3", "refine.batch_size=2"])):
        model = copy.deepcopy(dense)
        result = _compress(model, ids, *overrides)
        with torch.no_grad():
            errors[name] = float((model(ids).logits - reference).pow(2).mean())
        if name == "refined":
            assert [r.layer for r in result.refinement] == [0, 1]
            assert all(r.loss_after < r.loss_before for r in result.refinement)
            assert result.timings["refinement"] > 0
    assert errors["refined"] < 0.9 * errors["plain"]


def test_dense_target_refinement_runs_the_dense_stream(tiny_model, calib_ids):
    """target: dense fits layer 1 to the dense model's layer-1 outputs, not to the dense layer on compressed
    inputs: the two refinements differ from layer 1 on (layer 0's inputs are the same embeddings)."""
    ids = calib_ids(6, 24)
    results = {}
    for target in ("compressed", "dense"):
        model = tiny_model("llama", correlated=True)
        results[target] = _compress(model, ids, "refine.epochs=2", "refine.lr=1e-3", f"refine.target={target}")
    a, b = (results[t].refinement for t in ("compressed", "dense"))
    assert a[0].loss_before == pytest.approx(b[0].loss_before, rel=1e-9)
    assert a[1].loss_before != pytest.approx(b[1].loss_before, rel=1e-3)


def test_recipes_that_need_the_runner_refuse_precomputed_statistics(tiny_model, calib_ids):
    ids = calib_ids(6, 24)
    model = tiny_model("llama", correlated=True)
    stats = api.collect_statistics(model, ids, [load_recipe("svd-llm-20", CALIB + ["sequential.inputs=dense"])])
    for extra in ("refine.epochs=1", "sequential.granularity=group"):
        recipe = load_recipe("svd-llm-20", CALIB + ["sequential.inputs=dense", extra])
        with pytest.raises(ValueError, match="granularity: layer and no refinement"):
            api.compress(model, recipe, statistics=stats)


def test_refinement_and_group_sequential_stream_to_the_same_checkpoint(tmp_path, tiny_model, calib_ids):
    """--low-memory (one decoder layer read from disk at a time) writes the in-memory path's tensors exactly,
    with the dense stream, the dense twin of group-sequential "cross" and refinement all in play."""
    from tests.test_streaming import assert_streams_like_in_memory

    recipe = load_recipe("svd-llm-40", ("calibration.nsamples=4", "calibration.seqlen=32", "beta=0.25", "ridge=0.01",
                                        "sequential.granularity=group", "refine.epochs=1", "refine.target=dense"))
    result = assert_streams_like_in_memory(tmp_path, tiny_model("qwen2", correlated=True), recipe, calib_ids(4, 32))
    assert [r.layer for r in result.refinement] == [0, 1]


def test_the_report_shows_each_layers_refinement(tiny_model, calib_ids):
    from compressor.report.summary import build_report, render_markdown

    ids = calib_ids(6, 24)
    result = _compress(tiny_model("llama", correlated=True), ids, "refine.epochs=1", "sequential.granularity=group")
    report = build_report(result, model_source="tiny", params_before=1, params_after=1, bytes_before=1, bytes_after=1)
    assert report["sequential_granularity"] == "group"
    assert [r["layer"] for r in report["refinement"]] == [0, 1]
    first = report["refinement"][0]
    assert first["loss_after"] <= first["loss_before"] and first["steps"] == 1 and first["seconds"] >= 0
    md = render_markdown(report)
    assert "Block refinement" in md and f"| 0 | {first['loss_before']:.5f} |" in md
