"""Interrupted runs resume from their journal with tensors identical to an uninterrupted run's (issue 13)."""

from __future__ import annotations

import pytest
import torch

from compressor import api
from compressor.errors import UserError
from compressor.pipeline.journal import Journal, partial_dir
from compressor.recipe import load_recipe

from helpers import Crash, crash_after as _crash_after

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = ["calibration.nsamples=4", "calibration.seqlen=16"]
IDENTITY = {"recipe": "r", "model": "m", "calibration data": "c", "device": "cpu", "dtype": "auto", "mode": "x"}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("recipe,extra", [
    ("svd-llm-40", ["beta=0.25", "sequential.granularity=group", "refine.epochs=1", "refine.target=dense"]),
    ("eora-4bit", []),
    ("fwsvd-20", []),
])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_model, calib_ids, recipe, extra):
    ids = calib_ids(4, 16)
    r = load_recipe(recipe, CALIB + extra)
    reference = api.compress(tiny_model("qwen2", correlated=True), r, batches=ids)
    out = tmp_path / "out"
    journal = Journal.open(out, IDENTITY, resume=False)
    with pytest.raises(Crash):
        api.compress(tiny_model("qwen2", correlated=True), r, batches=ids, journal=journal, progress=_crash_after(0))
    assert (partial_dir(out) / "layer-00000.safetensors").is_file()

    with pytest.raises(UserError, match="pass --resume"):
        Journal.open(out, IDENTITY, resume=False)
    with pytest.raises(UserError, match="cannot resume: the recipe differ"):
        Journal.open(out, {**IDENTITY, "recipe": "other"}, resume=True)

    model = tiny_model("qwen2", correlated=True)
    resumed = api.compress(model, r, batches=ids, journal=Journal.open(out, IDENTITY, resume=True))
    assert resumed.resumed_from == 1
    want, got = _state(reference.model), _state(model)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert [m.to_dict() | {"seconds": 0} for m in resumed.modules] == \
        [m.to_dict() | {"seconds": 0} for m in reference.modules]
    assert [x.loss_after for x in resumed.refinement] == [x.loss_after for x in reference.refinement]


def test_a_journal_killed_before_its_first_layer_starts_afresh(tmp_path):
    out = tmp_path / "out"
    Journal.open(out, IDENTITY, resume=False)
    journal = Journal.open(out, {**IDENTITY, "recipe": "other"}, resume=False)  # nothing to keep, nothing to check
    assert journal.resumed() is None and journal.identity["recipe"] == "other"
