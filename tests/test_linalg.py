"""Truncated-SVD solvers and the Gram accumulation against dense references (CPU; the CUDA twins are in
test_gpu.py)."""

import pytest
import torch

from compressor.linalg import truncated_svd
from compressor.pipeline.stats import GRAM_CHUNK, StatsCollector

pytestmark = pytest.mark.usefixtures("one_thread")


def _decaying(b, m, n, seed=0, decay=0.9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(b, m, m, generator=g, dtype=dtype)).Q
    V = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=dtype)).Q
    k = min(m, n)
    s = decay ** torch.arange(k, dtype=dtype)
    return (U[..., :k] * s) @ V[..., :k].mT, s


def _error(M, U, s, Vh):
    return (M - (U * s[..., None, :]) @ Vh).flatten(1).norm(dim=1)


@pytest.mark.parametrize("shape", [(3, 40, 40), (2, 24, 60), (2, 60, 24)])
def test_gram_solver_reaches_the_eckart_young_optimum(shape):
    M, s_true = _decaying(*shape)
    rank = 10
    U, s, Vh = truncated_svd(M, rank, "gram")
    optimum = s_true[rank:].pow(2).sum().sqrt()
    assert torch.allclose(s, s_true[:rank].expand_as(s), rtol=1e-9)
    assert torch.allclose(_error(M, U, s, Vh), optimum.expand(shape[0]), rtol=1e-6)
    # Same subspace as LAPACK's SVD (signs may differ): compare the rank-r reconstructions.
    Uf, sf, Vhf = truncated_svd(M, rank, "full")
    assert torch.allclose((U * s[..., None, :]) @ Vh, (Uf * sf[..., None, :]) @ Vhf, atol=1e-9)


def test_gram_solver_on_a_rank_deficient_matrix_gives_finite_factors():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(2, 30, 3, generator=g, dtype=torch.float64) @ torch.randn(2, 3, 50, generator=g, dtype=torch.float64)
    U, s, Vh = truncated_svd(M, 8, "gram")  # asks for more than the rank (3)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert (s[:, 3:] < 1e-6 * s[:, :1]).all()
    assert _error(M, U, s, Vh).max() < 1e-8 * M.norm()
    zero = torch.zeros(1, 10, 12, dtype=torch.float64)
    U, s, Vh = truncated_svd(zero, 4, "gram")
    assert torch.equal((U * s[..., None, :]) @ Vh, zero)


def test_randomized_solver_error_is_close_to_optimal_when_rank_is_small():
    M, s_true = _decaying(2, 200, 160, decay=0.8)
    rank = 12
    optimum = s_true[rank:].pow(2).sum().sqrt()
    U, s, Vh = truncated_svd(M, rank, "randomized")
    err = _error(M, U, s, Vh)
    assert (err >= optimum * (1 - 1e-9)).all()  # nothing beats Eckart–Young
    assert (err <= optimum * 1.01).all()
    # Without power iterations a flat spectrum is much harder: still bounded, measurably worse.
    flat, flat_s = _decaying(1, 200, 160, decay=0.99)
    opt_flat = flat_s[rank:].pow(2).sum().sqrt()
    no_power = _error(flat, *truncated_svd(flat, rank, "randomized", power_iters=0))
    with_power = _error(flat, *truncated_svd(flat, rank, "randomized", power_iters=3))
    assert opt_flat <= with_power[0] <= no_power[0]


def test_batched_call_equals_the_per_matrix_loop():
    M, _ = _decaying(4, 32, 48, seed=3)
    for solver in ("gram", "full", "randomized"):
        batched = truncated_svd(M, 6, solver)
        for i in range(4):
            single = truncated_svd(M[i : i + 1], 6, solver)
            rec_b = (batched[0][i] * batched[1][i]) @ batched[2][i]
            rec_s = (single[0][0] * single[1][0]) @ single[2][0]
            assert torch.allclose(rec_b, rec_s, atol=1e-10), solver


def test_unknown_solver_is_an_error():
    with pytest.raises(ValueError, match="unknown svd solver"):
        truncated_svd(torch.eye(3, dtype=torch.float64)[None], 1, "qr")


def test_chunked_fp32_gram_matches_fp64_to_single_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * GRAM_CHUNK + 17, 24, generator=g) * torch.logspace(-2, 2, 24)  # wide dynamic range
    linear = torch.nn.Linear(24, 5)
    collector = StatsCollector({"lin": linear}, frozenset({"gram"}))
    collector.start_batch()
    linear(x)
    collector.remove()
    stats = collector.for_module("lin")
    exact = x.double().T @ x.double()
    assert stats.gram.dtype == torch.float64 and stats.count == x.shape[0]
    assert ((stats.gram - exact).abs() <= 1e-5 * exact.diagonal().sqrt()[:, None] * exact.diagonal().sqrt()).all()
    white = stats.whitening()
    assert stats.whitening() is white  # computed once per shared input
    stats.release_derived()
    assert stats.whitening() is not white


def test_cholesky_whitening_equals_eigh_on_a_well_conditioned_gram():
    from compressor.linalg import whitening

    g = torch.Generator().manual_seed(5)
    X = torch.randn(400, 30, generator=g, dtype=torch.float64) * torch.logspace(0, 1, 30, dtype=torch.float64)
    G = X.T @ X
    for method in ("eigh", "cholesky"):
        w = whitening(G, method=method)
        assert w.clamped == 0
        assert torch.allclose(w.S @ w.S.T, G, rtol=1e-5, atol=1e-6 * G.diagonal().max())
        assert torch.allclose(w.S @ w.inverse, torch.eye(30, dtype=torch.float64), atol=1e-9)
    # Truncating W·S keeps the same output error whichever square root S is used (S_chol = S_eigh · orthogonal).
    W = torch.randn(1, 20, 30, generator=g, dtype=torch.float64)
    errors = []
    for method in ("eigh", "cholesky"):
        w = whitening(G, method=method)
        U, s, Vh = truncated_svd(W @ w.S, 8)
        W_hat = (U * s[..., None, :]) @ Vh @ w.inverse
        errors.append(((W - W_hat) @ X.T).norm())
    assert torch.isclose(errors[0], errors[1], rtol=1e-6)


def test_cholesky_whitening_damps_a_rank_deficient_gram_and_counts_nothing_hidden():
    from compressor.linalg import whitening

    g = torch.Generator().manual_seed(6)
    X = torch.randn(10, 40, generator=g, dtype=torch.float64)  # 10 tokens, 40 features: rank 10
    w = whitening(X.T @ X, method="cholesky")
    assert torch.isfinite(w.S).all() and torch.isfinite(w.inverse).all()
    assert torch.allclose(w.S @ w.S.T, X.T @ X, atol=1e-4 * (X.T @ X).diagonal().max())
    with pytest.raises(FloatingPointError, match="not positive semi-definite"):
        whitening(-torch.eye(5, dtype=torch.float64), method="cholesky")
    with pytest.raises(ValueError, match="unknown whitening"):
        whitening(torch.eye(3, dtype=torch.float64), method="svd")
