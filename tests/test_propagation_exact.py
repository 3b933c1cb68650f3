"""What layer i+1 is calibrated on is exactly what layer i will be in the checkpoint: refined weights rounded
through the storage dtype, outputs computed by the saved layer itself, and compression-time forwards through the
exact (dequantise / densify) paths, never the packed kernels (whose results depend on the machine)."""

import pytest
import torch

from compressor import api
from compressor.nn import kernels
from compressor.nn.lowrank_linear import LowRankSparseLinear
from compressor.nn.quant_linear import QuantLinear
from compressor.pipeline.targets import find_decoder_layers
from compressor.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _first_call(module, record):
    def hook(mod, args, kwargs):
        if not record:
            record.append((args, kwargs))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32])
def test_layer_1_is_calibrated_on_the_saved_layer_0s_outputs_after_refinement(tiny_model, calib_ids, model_dtype):
    model = tiny_model("llama", correlated=True).to(model_dtype)
    recipe = load_recipe("svd-llm-20", ["refine.epochs=2", "refine.lr=1e-3"])
    _, layers = find_decoder_layers(model)
    seen0, seen1 = [], []
    hooks = [_first_call(layers[0], seen0), _first_call(layers[1], seen1)]  # their calibration calls
    result = api.compress(model, recipe, batches=calib_ids(4, 16), storage_dtype=torch.bfloat16)
    for h in hooks:
        h.remove()
    assert result.refinement[0].steps > 0 and not result.refinement[0].reverted
    assert all(p.dtype == model_dtype for p in model.parameters())
    assert all(torch.equal(p, p.to(torch.bfloat16).to(p.dtype)) for p in model.parameters())  # what is saved
    (args, kwargs), ((fed, *_), _) = seen0[0], seen1[0]
    with torch.no_grad():
        out = layers[0](*args, **kwargs)  # layer 0 as saved, on its own calibration inputs
    out = out[0] if isinstance(out, tuple) else out
    assert fed.dtype == model_dtype
    assert torch.equal(fed, out)


def test_compression_never_runs_the_packed_kernels(monkeypatch, tiny_model, calib_ids):
    def refuse(*args, **kwargs):
        raise AssertionError("a packed kernel ran during compression")

    ids = calib_ids(4, 16)
    # 8 bits, one scale per row (group 128 ≥ in_features): a layout torch's int8 kernel takes.
    int8 = load_recipe("rtn-4bit", ["options.bits=8"])
    model = tiny_model("llama")
    layer = api.compress(tiny_model("llama"), int8, batches=ids).model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.prepare() == "int8"  # the kernel exists for this layout

    monkeypatch.setattr(kernels, "matmul", refuse)
    monkeypatch.setattr(LowRankSparseLinear, "prepare", refuse)
    api.compress(model, int8, batches=ids)
    assert all(m.use_kernel for m in model.modules() if isinstance(m, QuantLinear))  # inference still fast
    sparse = tiny_model("llama")
    api.compress(sparse, load_recipe("lowrank-sparse-50"), batches=ids)
    assert any(isinstance(m, LowRankSparseLinear) for m in sparse.modules())
