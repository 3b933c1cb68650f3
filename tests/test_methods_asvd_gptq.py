"""ASVD, GPTQ and EoRA-over-GPTQ against their optimisation problems (../shared/METHODS.md), on random matrices.

Margins were measured first (see each comment) and set well above the measured ratios.
"""

import pytest
import torch

from compressor import quant, registry
from compressor.methods.gptq import GPTQOptions, gptq_codes, gptq_quantize
from compressor.recipe import load_recipe
from compressor.pipeline.stats import Stats
from test_methods import correlated_inputs, run, stats_of


def out_err(w, f, X):
    return ((w.double() - f.dense()) @ X.T).norm().item()


def scaled_channels(n, tokens, seed=0):
    """Independent channels whose magnitudes span two decades, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(0, -2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) * mags


# --- ASVD -------------------------------------------------------------------------------------------------


def test_asvd_with_alpha_zero_or_equal_means_is_plain_svd():
    W = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(0))
    uneven = Stats(count=10, abs_sum=torch.logspace(0, 3, 20, dtype=torch.float64))
    equal = Stats(count=10, abs_sum=torch.full((20,), 7.0, dtype=torch.float64))
    plain = run("svd", W, None, 6)
    for stats, alpha in ((uneven, 0.0), (equal, 0.5), (equal, 2.0)):
        result = run("asvd", W, stats, 6, alpha=alpha)
        for p, a in zip(plain.factors, result.factors):
            assert a.rank == 6
            assert torch.allclose(p.dense(), a.dense(), atol=1e-5)


def test_asvd_beats_svd_on_uneven_channels_and_alpha_one_matches_whitening():
    n = 64
    W = torch.randn(2, 48, n, generator=torch.Generator().manual_seed(3))
    X = scaled_channels(n, 500, seed=3)
    stats = stats_of(X)
    plain = run("svd", W, None, 12)
    asvd = run("asvd", W, stats, 12)  # α = 0.5
    asvd1 = run("asvd", W, stats, 12, alpha=1.0)
    white = run("svd-llm", W, stats, 12)
    for w, p, a, a1, wh in zip(W, plain.factors, asvd.factors, asvd1.factors, white.factors):
        assert out_err(w, a, X) < 0.7 * out_err(w, p, X)  # measured 0.53–0.54×
        # For independent channels the whitening is ≈ diag(rms x) ∝ mean|x|: α = 1 is near the optimum.
        assert out_err(w, wh, X) <= out_err(w, a1, X) * (1 + 1e-6)  # whitened SVD is optimal
        assert out_err(w, a1, X) < 1.05 * out_err(w, wh, X)  # measured 1.015–1.018×


def test_asvd_dead_channel_gives_finite_factors():
    X = scaled_channels(32, 200, seed=4)
    X[:, 5] = 0.0
    W = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(4))
    for alpha in (0.5, 2.0):
        f = run("asvd", W, stats_of(X), 6, alpha=alpha).factors[0]
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
        assert out_err(W[0], f, X) < 0.7 * out_err(W[0], run("svd", W, None, 6).factors[0], X)  # measured 0.46–0.48×
    zero = Stats(count=5, abs_sum=torch.zeros(32, dtype=torch.float64))  # nothing seen at all: plain SVD
    f = run("asvd", W, zero, 6).factors[0]
    assert torch.allclose(f.dense(), run("svd", W, None, 6).factors[0].dense(), atol=1e-5)


# --- GPTQ -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [20, 32])  # n = 100: divides / does not divide
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_beats_rtn_and_storage_is_rtn_format(bits, group_size, act_order):
    W = torch.randn(2, 24, 100, generator=torch.Generator().manual_seed(bits + group_size))
    X = correlated_inputs(100, 400, seed=1)
    opts = dict(bits=bits, group_size=group_size)
    gptq = run("gptq", W, stats_of(X), act_order=act_order, block_size=16, **opts)
    rtn = run("rtn", W, None, **opts)
    for w, g, r in zip(W, gptq.factors, rtn.factors):
        assert out_err(w, g, X) < 0.65 * out_err(w, r, X)  # measured 0.36–0.45×
        assert (g.bits, g.group_size, g.in_features) == (bits, group_size, 100)
        assert g.qweight.shape == r.qweight.shape and g.scales.shape == r.scales.shape == (24, -(-100 // group_size))
        assert g.scales.dtype == torch.float16 and (g.scales > 0).all()
    # The stored codes are exactly what GPTQ rounded to: pack/unpack and fp16 scales lose nothing.
    codes, scale, zero = gptq_codes(
        W.reshape(48, 100), stats_of(X).gram, GPTQOptions(act_order=act_order, block_size=16, **opts)
    )
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(scale, scale.half().float()) and torch.equal(zero, zero.round())
    dense = torch.cat([f.dequantized() for f in gptq.factors])
    assert torch.equal(dense, quant.dequantize(codes, scale, zero, group_size))
    assert torch.equal(torch.cat([quant.unpack(f.qweight, bits, 100) for f in gptq.factors]), codes)


def test_gptq_batched_equals_one_matrix_at_a_time():
    W = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(5))
    stats = stats_of(correlated_inputs(40, 200, seed=5))
    options = GPTQOptions(bits=4, group_size=16, act_order=True)
    batched = run("gptq", W, stats, bits=4, group_size=16, act_order=True)
    for w, f in zip(W, batched.factors):
        single = gptq_quantize(w, options, stats)
        assert torch.equal(single.qweight, f.qweight) and torch.equal(single.scales, f.scales)


def naive_obq(W, H, bits, clip):
    """Column-by-column optimal-brain-quantization update with the explicit inverse (no Cholesky, no blocks),
    fp64, one group per row: the textbook form of the update GPTQ computes with a Cholesky factor."""
    W = W.double().clone()
    n = W.shape[1]
    scale, zero = quant.rtn_params(W, bits, n, False, clip)
    s, z = scale[:, 0].double(), zero[:, 0].double()
    Hinv = torch.linalg.inv(H)
    Q = torch.empty_like(W)
    for j in range(n):
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, 2**bits - 1)
        Q[:, j] = q
        err = (W[:, j] - (q - z) * s) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]  # drop column j from the problem
    return Q


@pytest.mark.parametrize("clip", [False, True])
def test_gptq_matches_textbook_update_for_any_block_size(clip):
    n = 48
    W = torch.randn(32, n, generator=torch.Generator().manual_seed(6))
    gram = stats_of(correlated_inputs(n, 300, seed=6)).gram
    H = 2 * gram
    H = H + 0.01 * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    reference = naive_obq(W, H, 4, clip)
    for block_size in (1, 7, 128):
        codes, _, _ = gptq_codes(W, gram, GPTQOptions(bits=4, group_size=n, block_size=block_size, clip=clip))
        agree = (codes.double() == reference).double().mean().item()
        assert agree > 0.99, (block_size, agree)  # measured: all codes agree; fp32 vs fp64 may flip a tie


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_gptq_with_uncorrelated_equal_inputs_is_rtn(act_order, clip):
    W = torch.randn(2, 16, 50, generator=torch.Generator().manual_seed(7))
    stats = Stats(count=100, gram=3.0 * torch.eye(50, dtype=torch.float64))
    gptq = run("gptq", W, stats, bits=3, group_size=16, act_order=act_order, clip=clip)
    rtn = run("rtn", W, None, bits=3, group_size=16, clip=clip)
    for g, r in zip(gptq.factors, rtn.factors):  # a diagonal H spreads no error: nothing to compensate
        assert torch.equal(g.qweight, r.qweight) and torch.equal(g.scales, r.scales) and torch.equal(g.qzeros, r.qzeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dead_input_column(act_order):
    X = correlated_inputs(40, 200, seed=8)
    X[:, 5] = 0.0
    W = torch.randn(1, 16, 40, generator=torch.Generator().manual_seed(8))
    f = run("gptq", W, stats_of(X), bits=4, group_size=8, act_order=act_order).factors[0]
    dense = f.dense()
    assert torch.isfinite(dense).all()
    assert torch.equal(dense[:, 5], torch.zeros(16, dtype=torch.float64))  # never seen: stored as exactly 0
    rtn = run("rtn", W, None, bits=4, group_size=8).factors[0]
    assert out_err(W[0], f, X) < 0.7 * out_err(W[0], rtn, X)  # measured 0.48–0.50×


def test_gptq_raises_on_an_unusable_hessian():
    W = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(9))
    with pytest.raises(FloatingPointError, match="Cholesky"):
        run("gptq", W, Stats(count=1, gram=-torch.eye(16, dtype=torch.float64)), bits=4, group_size=8)


# --- EoRA over GPTQ ---------------------------------------------------------------------------------------


def test_eora_over_gptq_beats_eora_over_rtn():
    W = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(10))
    X = correlated_inputs(64, 400, seed=10)
    stats = stats_of(X)
    # Measured GPTQ/RTN output-error ratios: 0.49 at rank 4, 0.82 at rank 16 (the residual path of rank r
    # removes the r largest whitened error directions, so the bases' gap narrows as r approaches m = 32).
    for rank, margin in ((4, 0.65), (16, 0.95)):
        rtn = run("eora", W, stats, rank=rank, bits=3, group_size=16).factors[0]
        gptq = run("eora", W, stats, rank=rank, bits=3, group_size=16, base="gptq", act_order=True).factors[0]
        assert gptq.residual.rank == rank
        assert out_err(W[0], gptq, X) < margin * out_err(W[0], rtn, X)


def test_eora_options_and_recipes():
    Options = registry.get("eora").Options
    with pytest.raises(ValueError, match="base: gptq"):
        Options(base="rtn", act_order=True)
    assert Options().base == "rtn"  # eora-4bit and other existing recipes unchanged
    assert load_recipe("eora-4bit").method_options().base == "rtn"
    opts = load_recipe("eora-gptq-4bit").method_options()
    assert (opts.base, opts.bits, opts.group_size, opts.rank) == ("gptq", 4, 128, 64)
    assert opts.act_order and opts.damp == 0.01
    asvd = load_recipe("asvd-20")
    assert asvd.method == "asvd" and asvd.method_options().param_ratio == 0.8


def test_registry_declares_statistics():
    assert registry.get("gptq").needs == {"gram"} and not registry.get("gptq").factorizes
    assert registry.get("asvd").needs == {"abs_mean"} and registry.get("asvd").factorizes
    with pytest.raises(ValueError):
        registry.get("asvd").Options(param_ratio=0.8, alpha=2.5)
    with pytest.raises(ValueError):
        registry.get("gptq").Options(bits=9)


@pytest.mark.parametrize("act_order,clip,bits,tokens", [(True, True, 4, 2000), (False, True, 3, 2000),
                                                         (True, False, 8, 150), (False, False, 2, 150)])
def test_gptq_row_error_from_its_column_loop_is_the_output_error_on_the_gram(act_order, clip, bits, tokens):
    """Δ = e U (U: upper Cholesky factor of H_d⁻¹), so Δ G Δᵀ = (‖e‖² − λ‖Δ‖²)/2 without an m·n² product; also on
    a rank-deficient Gram (fewer tokens than inputs: the damping term is most of ‖e‖²) and with a dead input."""
    n = 300
    X = scaled_channels(n, tokens, seed=8)
    X[:, 3] = 0.0  # a dead input: H_ii = 1 there, Δ = 0
    gram = stats_of(X).gram
    W = torch.randn(40, n, generator=torch.Generator().manual_seed(8)) * 0.02
    options = GPTQOptions(bits=bits, group_size=64, act_order=act_order, clip=clip)
    codes, scale, zero, error = gptq_codes(W, gram, options, with_error=True)
    assert torch.equal(codes, gptq_codes(W, gram, options)[0])  # asking for the error changes nothing
    D = W.double() - quant.dequantize(codes, scale, zero, 64).double()
    exact = ((D @ gram) * D).sum(1)
    assert error.dtype == torch.float64 and error.shape == (40,)
    assert torch.allclose(error, exact, rtol=1e-4, atol=0)  # measured: ≤ 9e-5 per row at 8 bits, 1e-6 at ≤ 4
