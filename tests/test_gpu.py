"""CUDA twins of the CPU tests: batched == looped, fp64 eigh on the GPU, the layer-by-layer offload.

Run with `pytest -m gpu` on a machine with a GPU (the default suite skips them; the CPU versions of the same code
paths are in test_linalg.py, test_pipeline.py and test_streaming.py)."""

from __future__ import annotations

import pytest
import torch

from compressor import api
from compressor.pipeline import streaming
from compressor.linalg import truncated_svd, whitening
from compressor.recipe import load_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _reconstruction(U, s, Vh):
    return (U * s[..., None, :]) @ Vh


@pytest.mark.parametrize("solver", ["gram", "full", "randomized"])
def test_batched_equals_looped_and_cpu_on_cuda(solver):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 96, 160, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 160, dtype=torch.float64)
    cuda = M.cuda()
    batched = _reconstruction(*truncated_svd(cuda, 24, solver))
    looped = torch.stack([_reconstruction(*truncated_svd(cuda[i : i + 1], 24, solver))[0] for i in range(6)])
    cpu = _reconstruction(*truncated_svd(M, 24, solver))
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-9)
    torch.testing.assert_close(batched.cpu(), cpu, rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_fp64_whitening_on_cuda_matches_cpu(method):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2000, 256, generator=g, dtype=torch.float64)
    X[:, :4] *= 100.0  # outlier channels, as real LLM activations have
    G = X.T @ X
    cpu, gpu = whitening(G, method=method), whitening(G.cuda(), method=method)
    assert gpu.S.dtype == torch.float64 and gpu.S.is_cuda
    assert cpu.clamped == gpu.clamped
    torch.testing.assert_close(gpu.S @ gpu.S.T, G.cuda(), rtol=1e-8, atol=1e-6)
    torch.testing.assert_close((gpu.S @ gpu.inverse).cpu(), torch.eye(256, dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("recipe_name", ["svd-llm-20", "eora-4bit"])
def test_offloaded_gpu_compression_matches_cpu(tiny_model, calib_ids, recipe_name):
    recipe = load_recipe(recipe_name, ("calibration.nsamples=4", "calibration.seqlen=32"))
    ids = calib_ids(4, 32)
    on_cpu, on_gpu = tiny_model("llama", correlated=True), tiny_model("llama", correlated=True)
    api.compress(on_cpu, recipe, batches=ids)
    torch.cuda.reset_peak_memory_stats()
    result = api.compress(on_gpu, recipe, batches=ids, device="cuda")
    assert all(not p.is_cuda for p in on_gpu.parameters())  # layer-by-layer: everything back in CPU memory
    assert torch.cuda.max_memory_allocated() > 0
    assert len(result.modules) == 14
    with torch.no_grad():
        a, b = on_cpu(ids).logits, on_gpu(ids).logits
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()


def test_streaming_on_cuda_equals_in_memory(tmp_path, tiny_model, calib_ids):
    import shutil

    from safetensors.torch import load_file

    from compressor.resources import demo_model_dir

    model = tiny_model("qwen2", correlated=True)
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / file, folder / file)
    recipe = load_recipe("svd-llm-20", ("calibration.nsamples=4", "calibration.seqlen=32"))
    ids = calib_ids(4, 32)
    loaded = api.load_model(str(folder), device="cuda", dtype="float32", keep_on_cpu=True)
    api.compress(loaded.model, recipe, batches=ids, device="cuda", storage_dtype=loaded.storage_dtype).save(
        tmp_path / "memory", tokenizer=loaded.tokenizer)
    streaming.compress_streaming(str(folder), recipe, tmp_path / "streamed", batches=ids, device="cuda",
                                 dtype="float32")
    a, b = load_file(tmp_path / "memory" / "model.safetensors"), {}
    for f in (tmp_path / "streamed").glob("*.safetensors"):
        b.update(load_file(f))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_layerwise_fisher_on_cuda_matches_cpu(tiny_model, calib_ids):
    from compressor.pipeline.fisher import collect_fisher

    model = tiny_model("qwen2", correlated=True)
    ids = calib_ids(5, 32)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    cpu = collect_fisher(model, ids, names, batch_size=2)
    gpu = collect_fisher(model, ids, names, device="cuda", batch_size=2)
    assert all(not p.is_cuda for p in model.parameters())  # layers went to the GPU one at a time and came back
    for name in names:
        torch.testing.assert_close(gpu[name].out, cpu[name].out, rtol=1e-4, atol=0)
        torch.testing.assert_close(gpu[name].in_, cpu[name].in_, rtol=1e-4, atol=0)
