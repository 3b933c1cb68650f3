"""The compressed modules' inference copies (QuantLinear's packed kernel layout, LowRankSparseLinear's CSR or merged
product, fused siblings' concatenated A) are derived, never stored: none may outlive a move (`.to(device or dtype)`),
or `--low-memory` keeps every finished layer's copy after sending the layer to the meta device, and a GPU run keeps
every layer's copy on the GPU (issue 22)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from compressor import api, quant
from compressor.nn.factors import LowRank, Quantized
from compressor.nn.modules import (LowRankLinear, LowRankSparseLinear, QuantLinear, fuse_siblings,
                                   module_from_factors, prepare_inference)
from compressor.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

STORED = {"_parameters", "_buffers", "_modules"}


def derived_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors `module` itself holds outside its parameters and buffers, found through its attributes (tuples,
    lists, dicts, dataclasses, lrc's helper objects), never through other modules."""
    found, seen = [], set()

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            return
        if isinstance(obj, nn.Module) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple, set)):
            items = obj
        elif isinstance(obj, dict):
            items = obj.values()
        elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("compressor"):
            items = vars(obj).values()
        else:
            return
        for item in items:
            walk(item)

    for name, value in vars(module).items():
        if name not in STORED:
            walk(value)
    return found


def live_copies(model: nn.Module) -> dict[str, list[str]]:
    """{module name: devices of its derived tensors that are not on the meta device}."""
    out = {}
    for name, m in model.named_modules():
        devices = [str(t.device) for t in derived_tensors(m) if not t.is_meta]
        if devices:
            out[name] = devices
    return out


def test_lowrank_sparse_layers_sent_to_meta_hold_no_inference_copy(tiny_model, calib_ids):
    model = tiny_model("llama")
    api.compress(model, load_recipe("lowrank-sparse-50", ["options.iterations=2"]), batches=calib_ids(2, 16))
    sparse = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
    assert len(sparse) == 14
    for layer in model.model.layers:  # what --low-memory does with each finished layer
        layer.to("meta")
    assert live_copies(model.model.layers) == {}


def _quant_module(m=32, n=128, bits=4, group_size=64, rank=4):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g)
    s, z = quant.rtn_params(W, bits, group_size, False)
    residual = LowRank(torch.randn(rank, n, generator=g) * 0.1, torch.randn(m, rank, generator=g) * 0.1)
    factors = Quantized.from_codes(quant.quantize(W, s, z, bits, group_size), s, z, bits, group_size, residual)
    return module_from_factors(factors, torch.randn(m, generator=g), torch.float32).eval()


def _sparse_module(density, m=48, n=64, rank=4):
    g = torch.Generator().manual_seed(1)
    k = max(1, int(density * n))
    module = LowRankSparseLinear(n, m, rank, True, nnz_per_row=k)
    with torch.no_grad():
        module.A.weight.copy_(torch.randn(rank, n, generator=g))
        module.B.weight.copy_(torch.randn(m, rank, generator=g))
        module.S_values.copy_(torch.randn(m, k, generator=g))
        module.S_indices.copy_(torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(m)]))
    return module.eval()


class _Siblings(nn.Module):
    """Three low-rank linears reading one input (q/k/v), fused into one A GEMM by fuse_siblings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(16, 32)
        self.q, self.k, self.v = (LowRankLinear(32, 32, 4, False) for _ in range(3))

    def forward(self, ids):
        h = self.embed(ids)
        return self.q(h) + self.k(h) + self.v(h)


def _kinds():
    siblings = _Siblings().eval()
    assert len(fuse_siblings(siblings)) == 1
    return {"quant int4": (_quant_module(), torch.randn(3, 128)),
            "sparse csr": (_sparse_module(0.02), torch.randn(3, 64)),
            "sparse merged": (_sparse_module(0.3), torch.randn(3, 64)),
            "fused siblings": (siblings, torch.randint(0, 16, (2, 5)))}


@pytest.mark.parametrize("kind", ["quant int4", "sparse csr", "sparse merged", "fused siblings"])
@pytest.mark.parametrize("move", ["meta", "float64"])
def test_no_inference_copy_survives_a_move(kind, move):
    module, x = _kinds()[kind]
    prepare_inference(module)
    with torch.no_grad():
        before = module(x)
    assert live_copies(module)  # the copies exist before the move (else this test checks nothing)
    module.to("meta" if move == "meta" else torch.float64)
    assert live_copies(module) == {}
    assert sum(m.kernel_bytes() for m in module.modules() if hasattr(m, "kernel_bytes")) == 0
    if move == "float64":  # rebuilt on the next forward, in the new dtype, with the same result
        with torch.no_grad():
            after = module(x if not x.is_floating_point() else x.double())
        assert after.dtype == torch.float64 and live_copies(module)
        torch.testing.assert_close(after.float(), before, rtol=1e-2, atol=1e-2)
