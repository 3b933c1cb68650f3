"""lowrank-sparse (OATS-style W ≈ L + S): the alternation, the budget, its reduction to scaled SVD, its edge over
pure low rank on outlier-heavy weights, and the sparse module's save → reload round trip."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import compressor
from compressor import registry
from compressor.nn.factors import LowRankSparse
from compressor.io.checkpoint import checkpoint_bytes
from compressor.methods.lowrank_sparse import alternate, budget, channel_scales
from compressor.nn.modules import LowRankSparseLinear, empty_module, module_from_factors
from compressor.budget.rank import rank_for_ratio
from compressor.pipeline.stats import Stats

LS = registry.get("lowrank-sparse")


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.T


def stats_of(X):
    return Stats(count=X.shape[0], gram=X.T @ X, abs_sum=X.abs().sum(0))


def outlier_weight(m, n, seed):
    """Low rank + small noise + 2% large outliers: the structure low rank + sparse is made for."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) / 3 + 0.05 * torch.randn(m, n, generator=g)
    mask = torch.rand(m, n, generator=g) < 0.02
    return (W + mask * 8 * torch.randn(m, n, generator=g))[None]


def output_error(W, factors, X):
    return (((W[0].double() - factors.dense()) @ X.T).norm() / (W[0].double() @ X.T).norm()).item()


@pytest.mark.parametrize("per_row", [True, False])
def test_objective_never_increases(per_row):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 40, 32, generator=g, dtype=torch.float64)
    W[:, :, 3] *= 20  # a loud input channel
    d = channel_scales(stats_of(correlated_inputs(32, 300)), 32, 1e-6)
    r, k = budget(40, 32, LS.Options(sparsity_per="row" if per_row else "total"))
    *_, objective = alternate(W * d, r, k, 30, per_row, record=True)
    obj = torch.stack(objective)  # (iterations, batch)
    assert obj.shape == (30, 2)
    steps = obj[1:] - obj[:-1]
    assert (steps <= 1e-10 * obj[0]).all(), steps.max()
    assert (obj[-1] < 0.97 * obj[0]).all()  # and it does make progress (measured ≈ 0.85–0.9 of the first)


def test_subspace_rounds_never_increase_the_objective_need_no_full_svd_and_match_it(monkeypatch):
    """The default `svd: subspace` (warm-started subspace iteration + Rayleigh–Ritz on span[Q, U_prev]) keeps the
    alternation monotone, never calls a full SVD of the m×n residual, and ends where the full SVD's rounds end."""
    g = torch.Generator().manual_seed(1)
    m, n = 120, 200
    W = torch.randn(1, m, 24, generator=g) @ torch.randn(1, 24, n, generator=g) / 5 + 0.3 * torch.randn(1, m, n, generator=g)
    Wp = W * torch.logspace(0, -1, n)
    r, k = budget(m, n, LS.Options(size_ratio=0.5))
    assert 2 * (r + 8) < min(m, n)  # the subspace path applies
    *_, full = alternate(Wp, r, k, 40, True, record=True, svd="full")
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda M, *a, **kw: calls.append(M.shape) or real_svd(M, *a, **kw))
    *_, sub = alternate(Wp, r, k, 40, True, record=True, svd="subspace", oversample=8)
    assert calls == []
    sub = torch.stack(sub)[:, 0]
    assert ((sub[1:] - sub[:-1]) <= 1e-6 * sub[0]).all(), (sub[1:] - sub[:-1]).max()
    # measured: after 40 rounds full 11.163, subspace 11.111 (0.995; the alternation is not convex), first 14.53
    assert sub[-1] <= 1.003 * full[-1][0] and sub[-1] < 0.9 * sub[0]


@pytest.mark.parametrize("m,n", [(64, 48), (48, 64), (128, 32), (33, 17)])
@pytest.mark.parametrize("p,rf,mode", [(0.5, 0.3, "row"), (0.3, 0.5, "row"), (0.5, 0.3, "total"), (0.7, 0.0, "row")])
def test_budget_is_respected_exactly(m, n, p, rf, mode):
    W = torch.randn(1, m, n, generator=torch.Generator().manual_seed(m + n))
    options = LS.Options(param_ratio=p, rank_fraction=rf, iterations=3, sparsity_per=mode, sparse_format="indices")
    f = LS.decompose(W, stats_of(correlated_inputs(n, 100)), options).factors[0]
    kept = math.floor(p * m * n + 1e-9)
    assert f.rank == math.floor(rf * kept / (m + n) + 1e-9)
    assert f.num_params() == f.rank * (m + n) + f.nnz <= p * m * n
    if mode == "total":
        assert f.num_params() == kept  # exact
        assert f.spec() == {"kind": "lowrank_sparse", "rank": f.rank, "nnz": f.nnz}
    else:
        assert kept - m < f.num_params()  # at most one value per row left unused
        assert f.values.shape == f.indices.shape == (m, f.nnz // m)
        assert f.spec() == {"kind": "lowrank_sparse", "rank": f.rank, "nnz_per_row": f.nnz // m}
    assert f.indices.dtype == torch.int16


def test_param_ratio_one_or_more_is_refused():
    for bad in (1.0, 1.5, 0.0):
        with pytest.raises(ValidationError, match="param_ratio must be in"):
            LS.Options(param_ratio=bad)
    with pytest.raises(ValidationError):
        LS.Options(rank_fraction=1.2)
    with pytest.raises(ValidationError):
        LS.Options(rank=8)  # strict: the method computes its own rank


def test_rank_fraction_one_is_scaled_svd_truncation():
    W = torch.randn(2, 48, 32, generator=torch.Generator().manual_seed(4))
    stats = stats_of(correlated_inputs(32, 300) * torch.linspace(0.1, 3, 32, dtype=torch.float64))
    result = LS.decompose(W, stats, LS.Options(rank_fraction=1.0))
    d = (stats.gram.diagonal() / stats.count).sqrt()
    r = rank_for_ratio(48, 32, 0.5)
    for w, f in zip(W, result.factors):
        assert f.nnz == 0 and f.rank == r
        U, s, Vh = torch.linalg.svd(w.double() * d, full_matrices=False)
        reference = (U[:, :r] * s[:r]) @ Vh[:r] / d
        assert torch.allclose(f.dense(), reference, atol=1e-4)


def test_rank_fraction_zero_is_wanda_pruning():
    W = torch.randn(1, 24, 40, generator=torch.Generator().manual_seed(5))
    X = correlated_inputs(40, 200)
    f = LS.decompose(W, stats_of(X), LS.Options(rank_fraction=0.0, sparse_format="indices")).factors[0]
    score = W[0].double().abs() * X.norm(dim=0)  # |W_ij| · ‖x_j‖
    keep = score.topk(20, dim=1).indices
    assert f.rank == 0 and torch.equal(f.indices.long().sort(1).values, keep.sort(1).values)


def test_beats_svd_llm_at_the_same_budget_on_outlier_weights():
    m, n = 64, 48
    svd_llm = registry.get("svd-llm")
    ratios = []
    for seed in range(3):
        W = outlier_weight(m, n, seed)
        X = correlated_inputs(n, 400, seed)
        stats = stats_of(X)
        ours = LS.decompose(W, stats, LS.Options(param_ratio=0.5)).factors[0]
        # Give svd-llm one rank more than the budget allows: it stores at least as many values as we do.
        rank = rank_for_ratio(m, n, 0.5) + 1
        low = svd_llm.decompose(W, stats, svd_llm.Options(rank=rank), rank).factors[0]
        assert ours.num_params() <= 0.5 * m * n <= low.num_params()
        ratios.append(output_error(W, ours, X) / output_error(W, low, X))
    # Measured ratios 0.60, 0.78, 0.91 (svd-llm rank 14 = 1568 values vs rank 4 + 24/row sparse = 1536); against
    # svd-llm's in-budget rank 13 they are 0.51, 0.65, 0.75.
    assert max(ratios) < 0.97 and sum(ratios) / len(ratios) < 0.85, ratios


def test_dead_input_channel_gives_finite_factors():
    W = outlier_weight(32, 24, 7)
    X = correlated_inputs(24, 200)
    X[:, 5] = 0
    for mode in ("row", "total"):
        f = LS.decompose(W, stats_of(X), LS.Options(iterations=5, sparsity_per=mode)).factors[0]
        for t in (f.A, f.B, f.values):
            assert torch.isfinite(t).all()
        assert math.isfinite(output_error(W, f, X))
    no_data = Stats(count=0, gram=torch.zeros(24, 24, dtype=torch.float64))
    f = LS.decompose(W, no_data, LS.Options(iterations=3)).factors[0]
    assert torch.isfinite(f.dense()).all()


@pytest.mark.parametrize("mode", ["row", "total"])
def test_module_matches_its_factors_and_rebuilds_from_spec(mode):
    W = outlier_weight(40, 24, 1)
    f = LS.decompose(W, stats_of(correlated_inputs(24, 100)), LS.Options(iterations=4, sparsity_per=mode)).factors[0]
    bias = torch.randn(40)
    module = module_from_factors(f, bias, torch.float32)
    assert isinstance(module, LowRankSparseLinear) and module.spec() == f.spec()
    x = torch.randn(3, 5, 24)
    expected = x.double() @ f.dense().T + bias.double()
    assert torch.allclose(module(x).double(), expected, atol=1e-5)
    assert torch.allclose(module.dense_weight(), f.dense())
    empty = empty_module(f.spec(), 24, 40, True)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}
    assert empty.S_mask.dtype == torch.uint8 and f.spec()["format"] == "bitmask"  # the smaller format here
    assert sum(p.numel() for p in module.parameters()) == f.num_params() + 40
    module.to(torch.bfloat16)
    assert module.S_mask.dtype == torch.uint8 and module.S_values.dtype == torch.bfloat16
    # The index format holds the same S (what the smaller choice replaced).
    options = LS.Options(iterations=4, sparsity_per=mode, sparse_format="indices")
    g = LS.decompose(W, stats_of(correlated_inputs(24, 100)), options).factors[0]
    indexed = module_from_factors(g, bias, torch.float32)
    assert indexed.S_indices.dtype == torch.int16 and "format" not in g.spec()
    assert torch.allclose(g.dense(), f.dense()) and torch.allclose(indexed.dense_weight(), f.dense())


def test_factors_use_int32_indices_for_wide_inputs():
    f = LowRankSparse.from_indices(
        torch.zeros(1, 40000), torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([[39999], [0]]), in_features=40000
    )
    assert f.indices.dtype == torch.int32 and f.dense()[0, 39999] == 1


def test_compress_save_reload_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "dense")
    batches = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    result = compressor.compress(model, "lowrank-sparse-50", batches=batches)
    assert len(result.modules) == 14 and all(m.compressed for m in result.modules)
    assert all(m.params_after <= 0.5 * m.params_before for m in result.modules)
    result.save(tmp_path / "ls")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ls").eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    q = reloaded.model.layers[1].self_attn.q_proj
    assert isinstance(q, LowRankSparseLinear) and q.S_mask.dtype == torch.uint8 and q.spec()["format"] == "bitmask"
    assert torch.equal(q.S_mask, model.model.layers[1].self_attn.q_proj.S_mask)

    # Bytes: the targets' dense fp32 weights are replaced by fp32 factors + fp32 values + a 1-bit-per-weight mask,
    # at most half the dense bytes (recipe size_ratio 0.5).
    dense_bytes = checkpoint_bytes(tmp_path / "dense")
    saved_target = sum(4 * m.params_before for m in result.modules)
    stored = 0
    for m in reloaded.modules():
        if isinstance(m, LowRankSparseLinear):
            stored += 4 * (m.A.weight.numel() + m.B.weight.numel() + m.nnz) + m.S_mask.numel()
    assert stored == sum(m.bytes_after for m in result.modules)
    expected = dense_bytes - saved_target + stored
    actual = checkpoint_bytes(tmp_path / "ls")
    assert abs(actual - expected) < 8_000  # safetensors JSON headers only
    assert 0.45 * saved_target < stored <= 0.5 * saved_target
