"""SVD-LLM's `beta` / `ridge` options: over rank-r Ŵ minimise (1 − β)‖(W − Ŵ)X̂‖² + β‖W X − Ŵ X̂‖² + λ‖W − Ŵ‖²_F,
λ = δ·tr(Ĝ)/n (compressor/methods/svd_llm.py; ../shared/METHODS.md, "Error-aware variant"), and the runner's second
(dense) activation stream behind β > 0."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor import api, registry
from compressor.recipe import load_recipe
from compressor.pipeline.sequential import run_sequential
from compressor.pipeline.stats import Stats
from compressor.pipeline.targets import select_targets
from tests.test_methods import correlated_inputs, run
from tests.test_streaming import assert_streams_like_in_memory

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_stream_stats(X, Xh):
    """Stats of inputs X̂ (rows = tokens) with the cross statistic against the dense inputs X."""
    return Stats(count=X.shape[0], gram=Xh.T @ Xh, cross=X.T @ Xh)


def _perturbed(X, seed, scale=0.3):
    """X̂: X plus an upstream compression error."""
    g = torch.Generator().manual_seed(seed)
    return X + scale * torch.randn(X.shape, generator=g, dtype=torch.float64) * X.std(0)


def _objective(W, What, X, Xh, beta, ridge):
    """(1 − β)‖(W − Ŵ)X̂‖² + β‖W X − Ŵ X̂‖² + λ‖W − Ŵ‖²_F from the explicit matrices (rows of X = tokens)."""
    lam = ridge * (Xh.T @ Xh).trace() / W.shape[-1]
    return ((1 - beta) * (Xh @ (W - What).T).pow(2).sum() + beta * (X @ W.T - Xh @ What.T).pow(2).sum()
            + lam * (W - What).pow(2).sum()).item()


def test_no_beta_and_a_vanishing_ridge_is_plain_svd_llm_despite_a_cross_statistic():
    X = correlated_inputs(16, 300, seed=5)
    W = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stats = _two_stream_stats(X, _perturbed(X, 5))
    assert (stats.cross - stats.gram).abs().max() > 0.1 * stats.gram.abs().max()  # the cross term is nontrivial
    ridged, plain = run("svd-llm", W, stats, 5, ridge=1e-12), run("svd-llm", W, stats, 5)
    for a, p in zip(ridged.factors, plain.factors):
        torch.testing.assert_close(a.dense(), p.dense(), rtol=0, atol=1e-6 * p.dense().abs().max().item())


@pytest.mark.parametrize("beta", [0.5, 1.0])
@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_beta_and_ridge_give_the_optimum_of_their_objective(beta, ridge):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    Xh = _perturbed(X, 8)
    W = torch.randn(10, 12, generator=g, dtype=torch.float64)
    stats = _two_stream_stats(X, Xh)
    assert stats.whitening(ridge=ridge).clamped == 0  # well conditioned: no clamp regulariser in play
    f = lambda What: _objective(W, What, X, Xh, beta, ridge)  # noqa: E731
    # Full rank: the unconstrained minimiser W(C_β + λI)(Ĝ + λI)⁻¹.
    lam = ridge * stats.gram.trace() / 12
    eye = torch.eye(12, dtype=torch.float64)
    c_beta = stats.gram + beta * (stats.cross - stats.gram)
    best = W @ (c_beta + lam * eye) @ torch.linalg.inv(stats.gram + lam * eye)
    full = run("svd-llm", W[None], stats, 10, beta=beta, ridge=ridge).factors[0].dense()
    torch.testing.assert_close(full, best, rtol=0, atol=1e-5 * best.abs().max().item())
    method = registry.get("svd-llm")
    s = method.spectrum(W[None], stats, method.Options(rank=4, beta=beta, ridge=ridge))
    for rank in (2, 4, 7):
        ours = run("svd-llm", W[None], stats, rank, beta=beta, ridge=ridge).factors[0]
        value = f(ours.dense())
        # The discarded σ² of the target are exactly the objective's rank-dependent part (rank allocation uses them).
        assert value - f(best) == pytest.approx(s[0, rank:].pow(2).sum().item(), rel=1e-5)
        assert value < f(run("svd-llm", W[None], stats, rank).factors[0].dense())  # plain SVD-LLM at the same rank
        B, A = ours.B.double(), ours.A.double()
        for seed in range(4):  # any other rank-r map does no better
            noise = torch.Generator().manual_seed(seed)
            dB = torch.randn(B.shape, generator=noise, dtype=torch.float64) * 1e-2 * B.abs().mean()
            dA = torch.randn(A.shape, generator=noise, dtype=torch.float64) * 1e-2 * A.abs().mean()
            assert value < f((B + dB) @ (A + dA))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_ridge_shrinks_towards_w(beta):
    X = correlated_inputs(24, 400, seed=3)
    Xh = _perturbed(X, 4)
    W = torch.randn(2, 20, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    stats = _two_stream_stats(X, Xh)
    distances = []
    for ridge in (0.0, 0.01, 0.1, 1.0):
        assert stats.whitening(ridge=ridge).clamped == 0
        result = run("svd-llm", W, stats, 8, beta=beta, ridge=ridge)
        distances.append(torch.stack([(w - f.dense()).norm() for w, f in zip(W, result.factors)]))
    for closer, farther in zip(distances[1:], distances):
        assert (closer <= farther * (1 + 1e-9)).all()
    assert (distances[-1] < 0.9 * distances[0]).all()  # and really shrinks


def test_the_ridged_whitening_is_computed_once_per_shared_input():
    X = correlated_inputs(16, 300, seed=5)
    stats = Stats(count=300, gram=X.T @ X)
    white = stats.whitening(ridge=0.1)
    W = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    run("svd-llm", W, stats, 5, ridge=0.1)  # q, k, v of one input ask for the same whitening
    assert stats.whitening(ridge=0.1) is white and stats.whitening() is not white
    ridged = X.T @ X + 0.1 * (X.T @ X).trace() / 16 * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(white.S @ white.S.T, ridged)


def test_beta_is_optimal_for_the_dense_output_target():
    g = torch.Generator().manual_seed(3)
    X = correlated_inputs(24, 400, seed=3)
    Xh = X + 0.3 * torch.randn(X.shape, generator=g, dtype=torch.float64) * X.std(0)  # upstream compression error
    W = torch.randn(2, 20, 24, generator=g, dtype=torch.float64)
    stats = _two_stream_stats(X, Xh)
    target = X @ W.mT  # W x for every token: the dense model's outputs
    for rank in (2, 6, 12):
        aware = run("svd-llm", W, stats, rank, beta=1.0)
        plain = run("svd-llm", W, stats, rank)  # whitened on X̂, but fitting W x̂
        M = W @ stats.cross @ stats.whitening().inverse.T
        s = torch.linalg.svdvals(M)
        for k in range(2):
            out_aware = Xh @ aware.factors[k].dense().mT.double()
            out_plain = Xh @ plain.factors[k].dense().mT.double()
            e_aware = (target[k] - out_aware).pow(2).sum()
            e_plain = (target[k] - out_plain).pow(2).sum()
            # Closed form: the discarded σ² plus what no linear map of X̂ reaches, ‖W X‖² − ‖W C S⁻ᵀ‖².
            floor = target[k].pow(2).sum() - s[k].pow(2).sum()
            assert e_aware.item() == pytest.approx((s[k, rank:].pow(2).sum() + floor).item(), rel=1e-6)
            # Measured ratios e_aware / e_plain at ranks 2 / 6 / 12: 0.98 / 0.70 / 0.41.
            assert e_aware < {2: 0.995, 6: 0.8, 12: 0.5}[rank] * e_plain


def test_beta_with_identical_streams_is_plain_svd_llm():
    X = correlated_inputs(16, 300, seed=5)
    W = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stats = Stats(count=300, gram=X.T @ X)
    stats.cross = stats.gram
    for ridge in (0.0, 0.1):
        aware, plain = run("svd-llm", W, stats, 5, beta=1.0, ridge=ridge), run("svd-llm", W, stats, 5, ridge=ridge)
        for a, p in zip(aware.factors, plain.factors):
            torch.testing.assert_close(a.dense(), p.dense(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cross statistic"):
        run("svd-llm", W, Stats(count=300, gram=X.T @ X), 5, beta=0.5)


def test_options_and_the_cross_statistic_only_when_beta_is_positive():
    method = registry.get("svd-llm")
    assert method.needs_for(method.Options(param_ratio=0.8)) == {"gram"}
    assert method.needs_for(method.Options(param_ratio=0.8, ridge=0.1)) == {"gram"}
    assert method.needs_for(method.Options(param_ratio=0.8, beta=0.5)) == {"gram", "cross"}
    for bad in ({"beta": 1.5}, {"beta": -0.1}, {"ridge": -1.0}, {"beta": True}, {"error_aware": True}):
        with pytest.raises(ValueError):
            method.Options(param_ratio=0.8, **bad)


def test_runner_cross_statistic_pairs_dense_and_compressed_inputs(tiny_model, calib_ids):
    """Σ x x̂ᵀ of layer 1 must pair the dense model's inputs with those behind an altered layer 0, token by token."""
    ids = calib_ids(nsamples=3, seqlen=16)
    model = tiny_model("llama", correlated=True)
    dense = copy.deepcopy(model)
    targets = select_targets(model, ["*"], [])
    seen = {}

    def on_layer(index, collector):
        seen[index] = {owner: (s.gram.clone(), s.cross.clone(), s.cross is s.gram) for owner, s in collector.stats.items()}
        if index == 0:  # "compress" layer 0: any change will do
            model.model.layers[0].mlp.down_proj.weight.data.mul_(0.5)

    run_sequential(model, ids, targets, frozenset({"gram", "cross"}), on_layer, batch_size=2)
    altered = copy.deepcopy(dense)
    altered.model.layers[0].mlp.down_proj.weight.data.mul_(0.5)

    def inputs_of(m, name):
        store = []
        handle = m.get_submodule(name).register_forward_hook(lambda mod, a, o: store.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
        handle.remove()
        return torch.cat(store).double()

    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        x, xh = inputs_of(dense, name), inputs_of(altered, name)
        gram, cross, aliased = seen[1][name]
        assert not aliased and (x - xh).abs().max() > 1e-3  # the streams really differ at layer 1
        torch.testing.assert_close(cross, x.T @ xh, rtol=1e-4, atol=1e-4 * (x.T @ xh).abs().max().item())
        torch.testing.assert_close(gram, xh.T @ xh, rtol=1e-4, atol=1e-4 * (xh.T @ xh).abs().max().item())
    for name, (gram, cross, _) in seen[0].items():  # nothing upstream changed yet: the cross statistic is the Gram
        torch.testing.assert_close(cross, gram, rtol=1e-6, atol=1e-6 * gram.abs().max().item())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _inputs_of(model, names, ids):
    store = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda mod, a, o, name=name: store[name].append(a[0].reshape(-1, a[0].shape[-1]))) for name in names]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(v).double() for name, v in store.items()}


def test_beta_pipeline_fits_the_dense_outputs_better(tiny_model, calib_ids):
    ids = calib_ids(nsamples=8, seqlen=32)
    plain = api.compress(tiny_model("llama", correlated=True), "svd-llm-40", batches=ids).model
    aware = api.compress(tiny_model("llama", correlated=True), load_recipe("svd-llm-40", ["beta=1"]),
                         batches=ids).model
    layer = lambda m, i: m.model.layers[i]  # noqa: E731
    names0 = [n for n, _ in layer(plain, 0).named_modules() if n.endswith("proj")]
    # Layer 0 sees identical streams: the plain result (up to the rounding of a separately summed C = Ĝ).
    for n in names0:
        a, b = layer(plain, 0).get_submodule(n).dense_weight(), layer(aware, 0).get_submodule(n).dense_weight()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * a.abs().max().item())
    # Layer 1 was calibrated on X̂ = inputs behind compressed layer 0 (with dense layer 1); the dense model gives X.
    dense = tiny_model("llama", correlated=True)
    hybrid = tiny_model("llama", correlated=True)
    hybrid.model.layers[0] = layer(plain, 0)
    names = [f"model.layers.1.{n}" for n in names0]
    X, Xh = _inputs_of(dense, names, ids), _inputs_of(hybrid, names, ids)
    for name in names:
        W = dense.get_submodule(name).weight.double()
        target = X[name] @ W.T
        err = {key: (target - Xh[name] @ m.get_submodule(name).dense_weight().double().T).norm()
               for key, m in (("plain", plain), ("aware", aware))}
        assert err["aware"] < err["plain"], name  # the optimum of this very objective (up to the clamp regulariser)
    # With dense inputs both streams are one: exactly plain svd-llm.
    one = api.compress(tiny_model("llama", correlated=True), load_recipe("svd-llm-40", ["beta=1",
                       "sequential.inputs=dense"]), batches=ids)
    other = api.compress(tiny_model("llama", correlated=True), load_recipe("svd-llm-40", ["sequential.inputs=dense"]),
                         batches=ids)
    assert torch.equal(_logits(one.model, ids), _logits(other.model, ids))


def test_beta_and_ridge_stream_to_the_same_checkpoint(tmp_path, tiny_model, calib_ids):
    recipe = load_recipe("svd-llm-20", ("calibration.nsamples=4", "calibration.seqlen=32", "beta=0.5",
                                         "ridge=0.01"))
    assert_streams_like_in_memory(tmp_path, tiny_model("qwen2", correlated=True), recipe, calib_ids(4, 32))


@pytest.mark.parametrize("beta,ridge", [(0.25, 0.01), (1.0, 0.0)])
def test_a_wide_target_through_its_small_gram_equals_the_whitened_path(beta, ridge, monkeypatch):
    """m < n with β > 0: one Cholesky solve with Ĝ + λI and the m × m Gram of the target replace the n × n eigh and
    whitening (svd_llm._wide_target_svd); the answer is the whitened path's, nothing clamped on either."""
    from compressor.methods import svd_llm

    X = correlated_inputs(40, 600, seed=9)
    W = torch.randn(2, 24, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    stats = _two_stream_stats(X, _perturbed(X, 9))
    assert stats.whitening(ridge=ridge).clamped == 0
    calls = []
    real = svd_llm._wide_target_svd
    monkeypatch.setattr(svd_llm, "_wide_target_svd", lambda *a: calls.append(1) or real(*a))
    for rank in (5, 24):
        small = run("svd-llm", W, stats, rank, beta=beta, ridge=ridge)
        whitened = run("svd-llm", W, stats, rank, beta=beta, ridge=ridge, svd_solver="full")
        for a, b in zip(small.factors, whitened.factors):
            torch.testing.assert_close(a.dense(), b.dense(), rtol=0, atol=1e-8 * b.dense().abs().max().item())
    assert len(calls) == 2  # the "gram" solver took the small path, "full" did not


def test_a_wide_target_on_a_singular_gram_without_ridge_is_whitened_and_clamped():
    X = correlated_inputs(40, 600, seed=10)
    X[:, 3] = 0.0  # a dead input: Ĝ is singular and has no Cholesky factor
    W = torch.randn(1, 24, 40, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    stats = _two_stream_stats(X, _perturbed(X, 10) * (X != 0))
    out = run("svd-llm", W, stats, 6, beta=0.5)
    assert out.clamped_eigenvalues > 0 and torch.isfinite(out.factors[0].dense()).all()
