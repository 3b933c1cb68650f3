"""Targets sharing an input and a shape are decomposed in one batched call, split where the stacked fp64 weights
would pass apply.BATCH_BYTES (a 70B gate/up pair is 3.8 GB stacked): split or not, the checkpoint is the same."""

from __future__ import annotations

import pytest
import torch

from compressor.api import compress
from compressor.pipeline import apply

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch_sizes(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = apply._batches

    def spy(buckets):
        for key, members in real(buckets):
            sizes.append(len(members))
            yield key, members

    monkeypatch.setattr(apply, "_batches", spy)
    return sizes


@pytest.mark.parametrize("recipe", ["svd-llm-20", "eora-4bit", "lowrank-sparse-50"])
def test_batches_over_the_byte_limit_are_split_and_give_the_same_model(tiny_model, calib_ids, monkeypatch, recipe):
    ids = calib_ids(4, 32)
    sizes = _batch_sizes(monkeypatch)
    batched = compress(tiny_model("llama", correlated=True), recipe, batches=ids)
    assert max(sizes) >= 2  # q/k/v or gate/up share a call under the default limit

    sizes.clear()
    monkeypatch.setattr(apply, "BATCH_BYTES", 1)  # every target alone
    alone = compress(tiny_model("llama", correlated=True), recipe, batches=ids)
    assert sizes and max(sizes) == 1

    eval_ids = calib_ids(2, 16, seed=7)
    with torch.no_grad():
        a = batched.model(input_ids=eval_ids, use_cache=False).logits.double()
        b = alone.model(input_ids=eval_ids, use_cache=False).logits.double()
    assert ((a - b).norm() / a.norm()).item() < 1e-6
    for x, y in zip(batched.modules, alone.modules):
        assert (x.name, x.spec, x.bytes_after) == (y.name, y.spec, y.bytes_after)
        assert x.rel_output_error == pytest.approx(y.rel_output_error, rel=1e-6, abs=1e-9)


def test_the_limit_splits_a_bucket_into_calls_of_at_most_its_size(monkeypatch):
    monkeypatch.setattr(apply, "BATCH_BYTES", 2 * 4 * 8 * 8)  # two 4×8 matrices in fp64
    buckets = {(4, 8, 2): ["a", "b", "c"], (8, 8, None): ["d"]}
    assert list(apply._batches(buckets)) == [((4, 8, 2), ["a", "b"]), ((4, 8, 2), ["c"]), ((8, 8, None), ["d"])]
