"""The layer runner gives each decoder layer the arguments the model itself passes it (issue 13)."""

from __future__ import annotations

import pytest
import torch

from compressor.pipeline.fisher import collect_fisher
from compressor.pipeline.sequential import LayerCalls, capture_layer_calls, hidden_of, run_sequential
from compressor.pipeline.stats import StatsCollector
from compressor.pipeline.targets import find_decoder_layers, select_targets
from tests.helpers import chunk_fisher_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _plain_forward_grams(model, ids, names):
    """Σ x xᵀ of every target's input, from hooks on one ordinary forward of the whole model."""
    modules = {n: model.get_submodule(n) for n in names}
    collector = StatsCollector(modules, frozenset({"gram"}))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        collector.remove()
    return {n: collector.for_module(n).gram for n in names}


def _runner_grams(model, ids, batch_size=3):
    layer_targets = select_targets(model, ["*"], [])
    grams = {}

    def on_layer(index, collector):
        grams.update({n: collector.for_module(n).gram.clone() for n in collector.modules})

    run_sequential(model, ids, layer_targets, frozenset({"gram"}), on_layer, batch_size=batch_size, propagate="dense")
    return grams


def test_mixed_sliding_and_full_attention_layers_are_calibrated_on_their_own_masks(tiny_model, calib_ids):
    model = tiny_model("qwen2", sliding=True)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = calib_ids(6, 16)  # windows of 16 tokens, four times the sliding window

    runner = _runner_grams(model, ids)
    reference = _plain_forward_grams(model, ids, list(runner))
    for name, gram in reference.items():  # fp32 products in other batch splits: equal to ~1e-7 of the norm
        assert (runner[name] - gram).norm() <= 1e-6 * gram.norm(), name

    # Not vacuous: layer 1 given layer 0's arguments (the full mask) computes something else.
    _, layers = find_decoder_layers(model)
    calls = capture_layer_calls(model, layers, ids, device="cpu", offload="cpu", batch_size=6)
    with torch.no_grad():
        hidden = layers[0](*calls.first()[0][0], **calls.first()[0][1])
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        own = layers[1](*calls.onto(1, [((hidden,), {})])[0][0], **calls.per_layer[1][0][1])
        replayed = layers[1](hidden, *calls.first()[0][0][1:], **calls.first()[0][1])
    own, replayed = (o[0] if isinstance(o, tuple) else o for o in (own, replayed))
    assert (own - replayed).abs().max() > 1e-3


def test_capture_records_every_layer_once_per_batch_and_shares_repeated_tensors(tiny_model, calib_ids):
    model = tiny_model("qwen2", sliding=True)
    _, layers = find_decoder_layers(model)
    calls = capture_layer_calls(model, layers, calib_ids(5, 16), device="cpu", offload="cpu", batch_size=2)
    assert [len(per) for per in calls.per_layer] == [3, 3]  # batches of 2, 2 and 1
    assert all(hidden_of(c) is None for c in calls.per_layer[1])  # computed by the runner, never replayed
    cos0, cos1 = (calls.per_layer[i][0][1]["position_embeddings"][0] for i in (0, 1))
    assert cos0 is cos1  # one rotary table for both layers, not a copy per layer
    assert isinstance(calls, LayerCalls) and type(model.model.layers[0]).__name__ == "Qwen2DecoderLayer"


def test_fisher_pass_on_mixed_attention_matches_whole_model_autograd(tiny_model, calib_ids):
    model = tiny_model("qwen2", sliding=True)
    ids = calib_ids(4, 16)
    names = ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    fisher = collect_fisher(model, ids, names, batch_size=2)
    for name in names:
        sq = chunk_fisher_reference(model, ids, name, chunk=2)
        torch.testing.assert_close(fisher[name].out, sq.sum(1), rtol=1e-5, atol=0, msg=name)
