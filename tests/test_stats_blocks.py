"""Statistics accumulated in column blocks: the temporaries of Σ x xᵀ and Σ x x̂ᵀ stay bounded by a block of
columns (a 70B down_proj has n = 28672: one unblocked fp32 product is 3.3 GB), and the sums are unchanged."""

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
