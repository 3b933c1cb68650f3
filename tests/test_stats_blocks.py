"""Statistics accumulated in column blocks: the temporaries of Σ x xᵀ and Σ x x̂ᵀ stay bounded by a block of
columns (a 70B down_proj has n = 28672: one unblocked fp32 product is 3.3 GB), and the sums are unchanged."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from compressor.pipeline import stats as stats_module
from compressor.pipeline.stats import StatsCollector


class _LargestProduct(TorchDispatchMode):
    """Records the largest number of elements any matmul produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.largest = max(self.largest, out.numel())
        return out


def _collect(x, x_dense, needs):
    linear = nn.Linear(x.shape[-1], 1, bias=False)  # its own forward: a (tokens, 1) product
    collector = StatsCollector({"lin": linear}, frozenset(needs))
    collector.start_batch({"lin": x_dense})
    with torch.no_grad():
        linear(x)
    collector.remove()
    return collector.stats["lin"]


def test_cross_and_gram_are_accumulated_in_column_blocks_with_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(0)
    n = 24
    x = torch.randn(2, 50, n, generator=g)
    x_dense = x + 0.1 * torch.randn(2, 50, n, generator=g)
    X, R = x.reshape(-1, n).double(), x_dense.reshape(-1, n).double()

    whole = _collect(x, x_dense, {"gram", "cross"})
    monkeypatch.setattr(stats_module, "GRAM_COLUMNS", 5)  # 24 columns: blocks of 5, 5, 5, 5, 4
    monkeypatch.setattr(stats_module, "GRAM_CHUNK", 40)  # 100 tokens: chunks of 40, 40, 20
    with _LargestProduct() as probe:
        blocked = _collect(x, x_dense, {"gram", "cross"})
    assert probe.largest <= n * 5  # no product wider than one block of columns (unblocked: n × n = 576)
    for got, want, reference in ((blocked.cross, whole.cross, R.T @ X), (blocked.gram, whole.gram, X.T @ X)):
        assert got.dtype == torch.float64 and got.shape == (n, n)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # fp32 products: diag ≈ 100
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-4)


class _Flops(TorchDispatchMode):
    """Multiply-adds of every matmul (m·k·n)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func == torch.ops.aten.mm.default:
            self.total += args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        return out


def test_the_gram_computes_its_upper_blocks_only_and_is_exactly_symmetric(monkeypatch):
    """xᵀx is symmetric: only the blocks on and above the diagonal are multiplied (≤ 0.6 of the full product's
    multiply-adds at 8 blocks), the rest mirrored, and the result is the full product's."""
    g = torch.Generator().manual_seed(1)
    n, tokens = 64, 30
    x = torch.randn(tokens, n, generator=g)
    monkeypatch.setattr(stats_module, "GRAM_COLUMNS", 8)
    linear = nn.Linear(n, 1, bias=False)
    collector = StatsCollector({"lin": linear}, frozenset({"gram"}))
    collector.start_batch()
    with torch.no_grad(), _Flops() as flops:
        linear(x)
    collector.remove()
    gram = collector.stats["lin"].gram
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, x.double().T @ x.double(), rtol=1e-5, atol=1e-4)
    full = tokens * n * n
    assert flops.total - tokens * n <= 0.6 * full  # (the linear's own forward: tokens × n × 1)


def test_a_gram_only_the_report_reads_is_fp32_and_gives_the_same_output_errors(tiny_model, calib_ids, monkeypatch):
    """rtn needs no Gram; the report's output error does. That Gram is accumulated in fp32 (half the bytes: 3.3 GB
    instead of 6.6 at a 70B down_proj) and never copied to fp64, and the reported errors equal the fp64 ones."""
    from compressor.api import compress
    from compressor.pipeline import apply as apply_module
    from compressor.recipe import load_recipe

    seen = []
    errors = apply_module._errors

    def spy(W, W_hat, gram):
        seen.append(gram.dtype)
        return errors(W, W_hat, gram)

    monkeypatch.setattr(apply_module, "_errors", spy)
    batches = calib_ids()
    rtn = compress(tiny_model("llama", correlated=True), load_recipe("rtn-4bit"), batches=batches)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    from compressor.pipeline import compression

    monkeypatch.setattr(compression, "REPORT_STATS", frozenset({"gram"}))  # the fp64 report Gram of every run before
    reference = compress(tiny_model("llama", correlated=True), load_recipe("rtn-4bit"), batches=batches)
    assert seen and set(seen) == {torch.float64}
    for a, b in zip(rtn.modules, reference.modules):
        assert a.rel_output_error == pytest.approx(b.rel_output_error, rel=1e-5)
        assert a.rel_output_error > 0.01  # 4 bits leave a real error to compare
