"""`auto` shares GPTQ's Hessian factor (the damped H⁻¹'s Cholesky, an n³ solve on the Gram alone) across its five
bit widths and across the targets that read the same input (q/k/v), in planning and when it builds: per target
of the tiny model's planning pass, 11 Hessian factorisations before, 1/3 + 6 after (6: the two factor-quantisation
probes). Exact: the same choices, the same codes."""

import pytest
import torch

from compressor.methods import auto, gptq
from compressor.methods.auto import AutoOptions
from compressor.pipeline.stats import Stats

pytestmark = pytest.mark.usefixtures("one_thread")

N = 48


def _case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, N, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, N, dtype=torch.float64)
    W = torch.randn(3, 32, N, generator=g)  # three readers of one input, like q/k/v
    return W, Stats(count=600, gram=x.T @ x)


def _count_hessians(monkeypatch):
    """Counts factorisations of GPTQ Hessians: the Cholesky of H itself (that of H⁻¹ is the upper one)."""
    counts = {"gram": 0, "other": 0}
    original = torch.linalg.cholesky_ex

    def counted(H, *args, upper=False, **kwargs):
        if not upper:
            counts["gram" if H.shape == (N, N) else "other"] += 1
        return original(H, *args, upper=upper, **kwargs)

    monkeypatch.setattr(gptq.torch.linalg, "cholesky_ex", counted)
    return counts


def _tensors(factors) -> dict:
    out = {k: v for k, v in vars(factors).items() if isinstance(v, torch.Tensor)}
    if getattr(factors, "residual", None) is not None:
        out.update({f"residual.{k}": v for k, v in vars(factors.residual).items()})
    return out


def _plan_and_build(W, stats, options):
    offered = [auto.choices(w, stats, options) for w in W]
    chosen = [max((c for c in cs if c.encoding and "eora" in c.encoding[0]), key=lambda c: c.bytes) for cs in offered]
    built = [auto.decompose(W[i : i + 1], stats, options, chosen[i].encoding).factors[0] for i in range(len(W))]
    base = [auto.decompose(W[i : i + 1], stats, options, ("gptq-4bit", 0)).factors[0] for i in range(len(W))]
    stats.release_derived()
    return offered, built + base


def test_auto_factors_gptqs_hessian_once_per_input_with_the_same_result(monkeypatch):
    W, stats = _case()
    options = AutoOptions(group_size=16, rank_step=8, speed="any")  # all five widths and both factor probes
    counts = _count_hessians(monkeypatch)
    for w in W:
        auto.choices(w, stats, options)
    # One factorisation of the Gram for 3 targets × 5 widths (before: 15), and one (without act-order: a different
    # factor) for the 3 targets × 2 factor-quantisation probes, whose A is quantised on the Gram (before: 6).
    assert counts["gram"] == 1 + 1
    assert counts["other"] == 4 * 3  # the probes' B on A G Aᵀ, twice each
    stats.release_derived()

    offered, built = _plan_and_build(W, stats, options)
    monkeypatch.setattr(Stats, "derived", lambda self, key, compute: compute())  # every solve on its own, as before
    again, rebuilt = _plan_and_build(W, stats, options)
    assert offered == again  # the same bytes and predicted errors, exactly
    for a, b in zip(built, rebuilt):  # GPTQ + EoRA residual, then GPTQ alone: every tensor equal
        ta, tb = _tensors(a), _tensors(b)
        assert ta.keys() == tb.keys() and len(ta) >= 3
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # and the shared factor gives exactly GPTQ's own codes
    own = gptq.gptq_quantize(W[0], gptq.GPTQOptions(bits=4, group_size=16, act_order=True), stats)
    assert torch.equal(own.dequantized(), built[3].dequantized())


def test_auto_predicts_gptq_errors_from_the_column_loop_as_the_product_with_the_gram_would():
    """auto's GPTQ candidates take their per-row output error from GPTQ's loop (gptq.gptq_codes `with_error`), not
    from (W − Q) G (W − Q)ᵀ (2·m·n² flops a width: at 7B most of auto's planning); weighted by h as the budget is."""
    W, stats = _case()
    options = AutoOptions(group_size=16, rank_step=8, speed="any")
    h = torch.linspace(0.5, 2.0, W.shape[1], dtype=torch.float64)
    offered = auto.choices(W[0], stats, options, h.sqrt())
    checked = 0
    for c in offered:
        if c.encoding and c.encoding[0].startswith("gptq") and "eora" not in c.encoding[0]:
            D = W[0].double() - auto.decompose(W[:1], stats, options, c.encoding).factors[0].dense()
            rows = ((D @ stats.gram) * D).sum(1)
            assert c.error == pytest.approx(float((rows * h).sum()), rel=1e-5)
            assert c.predicted == pytest.approx(float(rows.sum() / (W[0].double() @ stats.gram * W[0].double()).sum())
                                                ** 0.5, rel=1e-4)
            checked += 1
    assert checked == 5
    stats.release_derived()
