"""FWSVD: the maths (uniform Fisher = plain SVD on both axes; the weighted error is exactly the weighted tail, so
it is optimal and beats plain SVD on the weighted objective), the Fisher pass (matches brute-force squared
gradients batch by batch and leaves the model as it found it), and the pipeline (compress → save → load with
identical logits; global allocation; precomputed statistics)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import compressor
from compressor import api, registry
from compressor.pipeline import fisher as fisher_module
from compressor.pipeline.fisher import collect_fisher
from compressor.nn.modules import LowRankLinear
from compressor.recipe import load_recipe
from compressor.pipeline.stats import Stats
from tests.helpers import chunk_fisher_reference

from conftest import TINY_SIZES

EVAL_IDS = torch.randint(0, TINY_SIZES["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(123))


pytestmark = pytest.mark.usefixtures("one_thread")


def run(method, W, stats, rank, **options):
    m = registry.get(method)
    opts = m.Options(rank=rank, **options)
    return m.decompose(W, stats, opts, rank)


def dense(result) -> torch.Tensor:
    return torch.stack([f.dense() for f in result.factors])


def fisher_stats(m, n, generator, b=None) -> Stats:
    shape = (lambda k: (k,)) if b is None else (lambda k: (b, k))
    return Stats(count=1, fisher=torch.logspace(0, -4, m, dtype=torch.float64)[torch.randperm(m, generator=generator)]
                 .expand(shape(m)).contiguous(),
                 fisher_in=torch.rand(shape(n), generator=generator, dtype=torch.float64).pow(4) + 1e-3)


def weighted(delta: torch.Tensor, d: torch.Tensor, axis: str) -> torch.Tensor:
    """‖diag(d) Δ‖_F (out) or ‖Δ diag(d)‖_F (in) per matrix of the batch."""
    delta = delta.double()
    return (d[..., :, None] * delta if axis == "out" else delta * d[..., None, :]).flatten(-2).norm(dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# maths


@pytest.mark.parametrize("axis", ["out", "in"])
def test_uniform_fisher_is_plain_svd(axis):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 24, 16, generator=g)
    stats = Stats(count=1, fisher=torch.full((24,), 3.7, dtype=torch.float64),
                  fisher_in=torch.full((16,), 0.2, dtype=torch.float64))
    fw = run("fwsvd", W, stats, 5, axis=axis)
    plain = run("svd", W, Stats(), 5)
    assert fw.clamped_eigenvalues == 0
    assert (dense(fw) - dense(plain)).abs().max().item() < 1e-5
    assert torch.allclose(registry.get("fwsvd").spectrum(W, stats, registry.get("fwsvd").Options(rank=5, axis=axis)),
                          torch.linalg.svdvals(W.double()), atol=1e-5)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_weighted_error_is_the_weighted_tail_and_beats_plain_svd(axis):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(2, 40, 30, generator=g)
    stats = fisher_stats(40, 30, g, b=2)
    rank = 8
    d = (stats.fisher if axis == "out" else stats.fisher_in).sqrt()  # raw √I: the floor (1e-6) never binds here
    fw = dense(run("fwsvd", W, stats, rank, axis=axis))
    plain = dense(run("svd", W, Stats(), rank))
    M = d[..., :, None] * W.double() if axis == "out" else W.double() * d[..., None, :]
    tail = torch.linalg.svdvals(M)[:, rank:].pow(2).sum(-1).sqrt()
    err_fw, err_plain = weighted(fw - W.double(), d, axis), weighted(plain - W.double(), d, axis)
    assert torch.allclose(err_fw, tail, rtol=1e-5)  # Eckart–Young on diag(d)W: optimal
    assert (err_fw / err_plain).max().item() < 0.8  # and clearly better than ignoring the Fisher (measured ~0.5)
    options = registry.get("fwsvd").Options(rank=rank, axis=axis)
    spectrum = registry.get("fwsvd").spectrum(W, stats, options)
    top = d.amax(-1)  # spectrum of the normalised weights: the same up to the scale of d
    assert torch.allclose(spectrum[:, rank:].pow(2).sum(-1).sqrt() * top, tail, rtol=1e-5)


def test_batched_equals_looped_and_shared_vector_broadcasts():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(3, 20, 12, generator=g)
    stats = fisher_stats(20, 12, g)  # (m,) / (n,): one vector for the whole batch
    batched = dense(run("fwsvd", W, stats, 4))
    looped = torch.cat([dense(run("fwsvd", W[i : i + 1], stats, 4)) for i in range(3)])
    assert (batched - looped).abs().max().item() < 1e-6


def test_zero_and_dead_fisher_give_finite_factors_and_are_counted():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(2, 16, 12, generator=g)
    fisher = torch.rand(2, 16, generator=g, dtype=torch.float64) + 0.1
    fisher[0, :3] = 0.0  # three rows the loss never reached
    fisher[1] = 0.0  # a whole module with no gradient: plain SVD
    result = run("fwsvd", W, Stats(count=1, fisher=fisher), 4)
    assert result.clamped_eigenvalues == 3 + 16
    out = dense(result)
    assert torch.isfinite(out).all()
    assert (out[1] - dense(run("svd", W[1:], Stats(), 4))[0]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="needs Fisher"):
        run("fwsvd", W, Stats(count=1), 4)


# ---------------------------------------------------------------------------------------------------------------
# the Fisher pass


@pytest.mark.parametrize("arch,tie,head_rows", [("llama", False, None), ("qwen2", True, None), ("llama", False, 37)])
def test_layerwise_fisher_matches_whole_model_autograd_and_leaves_no_trace(tiny_model, calib_ids, monkeypatch, arch,
                                                                         tie, head_rows):
    """head_rows: the head's product in slices of 37 vocabulary rows (7 slices, the last one short) and its
    logits 3 positions at a time, as a large vocabulary takes them."""
    if head_rows is not None:
        monkeypatch.setattr(fisher_module, "HEAD_SLICE_ELEMENTS", head_rows * TINY_SIZES["hidden_size"])
        monkeypatch.setattr(fisher_module, "LOGIT_SLICE_ELEMENTS", 3 * TINY_SIZES["vocab_size"])
    model = tiny_model(arch, tie=tie)
    batches = calib_ids(nsamples=5, seqlen=16)
    target, other = "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    fisher = collect_fisher(model, batches, [target, other], batch_size=2)  # chunks of 2, 2 and 1 windows

    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())

    # Reference: whole-model autograd of HF's own loss per chunk of 2, 2 and 1 windows, squared gradients summed.
    reference = tiny_model(arch, tie=tie).eval()
    for name in (target, other):
        W = reference.get_submodule(name).weight
        sq = chunk_fisher_reference(reference, batches, name, chunk=2)
        assert fisher[name].out.dtype == torch.float64 and fisher[name].out.shape == (W.shape[0],)
        assert torch.allclose(fisher[name].out, sq.sum(1), rtol=1e-5, atol=0)
        assert torch.allclose(fisher[name].in_, sq.sum(0), rtol=1e-5, atol=0)
        assert sq.sum(1).min() > 0 and sq.sum(1).max() > 1.5 * sq.sum(1).min()  # non-trivial importances

    # Chunks of one window: the per-window Fisher, a different (noisier-per-term) estimate.
    per_window = collect_fisher(model, batches, [target], batch_size=1)
    assert not torch.allclose(per_window[target].out, fisher[target].out, rtol=1e-3, atol=0)


def test_collect_fisher_refuses_a_linear_outside_the_decoder_layers(tiny_model, calib_ids):
    with pytest.raises(ValueError, match="lm_head is not inside a decoder layer"):
        collect_fisher(tiny_model("llama"), calib_ids(nsamples=2, seqlen=8), ["lm_head"])


# ---------------------------------------------------------------------------------------------------------------
# pipeline


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=EVAL_IDS, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fwsvd_recipe_roundtrips_with_identical_logits(tmp_path, tiny_model, calib_ids, arch):
    dense_model = tiny_model(arch)
    model = tiny_model(arch)
    batches = calib_ids()
    result = compressor.compress(model, "fwsvd-20", batches=batches)
    assert "fisher" in result.timings and not model.training
    assert all(p.grad is None for p in model.parameters())
    compressed = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(compressed) == 7 * TINY_SIZES["num_hidden_layers"] == len(result.modules)
    for r in result.modules:
        m, n = r.shape
        assert r.compressed and compressed[r.name].rank == math.floor(0.8 * m * n / (m + n))
        assert r.rel_output_error is not None and math.isfinite(r.rel_output_error)
    # The rows really were weighted: layer 0 (dense inputs) differs from plain SVD at the same rank.
    svd = api.compress(tiny_model(arch), "svd-20", batches=batches)
    name = "model.layers.0.mlp.up_proj"
    assert not torch.allclose(model.get_submodule(name).dense_weight(), svd.model.get_submodule(name).dense_weight())

    expected = logits(model)
    assert not torch.equal(expected, logits(dense_model))
    out = result.save(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(loaded), expected)


def test_fwsvd_axis_in_global_allocation_and_precomputed_statistics(tiny_model, calib_ids):
    batches = calib_ids(nsamples=4, seqlen=32)
    recipe = load_recipe("fwsvd-20", ["allocation=global", "allocation_options.weight=relative"])  # raw: refused
    result = api.compress(tiny_model("llama"), recipe, batches=batches)
    before = sum(r.params_before for r in result.modules)
    after = sum(r.params_after for r in result.modules)
    assert after <= 0.8 * before
    ranks = [r.spec["rank"] for r in result.modules if r.compressed]
    assert len(set(ranks)) > 3  # the Fisher-weighted spectra really steer the budget

    # axis "in" and the dense-inputs route through collect_statistics give the same model as a direct run
    recipe = load_recipe("fwsvd-20", ["axis=in", "sequential.inputs=dense"])
    direct = api.compress(tiny_model("llama"), recipe, batches=batches)
    model = tiny_model("llama")
    stats = api.collect_statistics(model, batches, [recipe])
    assert "fisher" in stats.needs and all(len(g) == 1 for groups, _ in stats.layers for g in groups.values())
    reused = api.compress(model, recipe, statistics=stats)
    assert torch.equal(logits(reused.model), logits(direct.model))
    axis_out = api.compress(tiny_model("llama"), load_recipe("fwsvd-20", ["sequential.inputs=dense"]),
                            batches=batches)
    assert not torch.equal(logits(axis_out.model), logits(direct.model))
