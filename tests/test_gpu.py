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
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-9)  # one test matrix for the batch and the loop
    if solver != "randomized":  # deterministic: the same truncation on either device, to rounding
        torch.testing.assert_close(batched.cpu(), cpu, rtol=0, atol=1e-8)
        return
    # The randomized range finder draws its test matrix from the device's own generator (CPU and CUDA streams
    # differ), so the devices' answers differ by more than rounding; each must be near the Eckart–Young optimum
    # ‖M − M_24‖_F = √(Σ_{i>24} σ_i²). Measured on CPU over 30 seeds: at most 1.0002× the optimum.
    optimum = torch.linalg.svdvals(M)[:, 24:].square().sum(-1).sqrt()
    for answer in (batched.cpu(), cpu):
        ratio = (M - answer).norm(dim=(-2, -1)) / optimum
        assert (ratio < 1.01).all(), ratio


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
    result = api.compress(on_gpu, recipe, batches=ids, device="cuda")
    assert all(not p.is_cuda for p in on_gpu.parameters())  # layer-by-layer: everything back in CPU memory
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


def _warm_up_cuda_libraries():
    """cuBLAS and cuSOLVER keep their handles' workspaces once created: create them before measuring."""
    x = torch.randn(512, 512, device="cuda", dtype=torch.float64)
    for t in (x, x.float()):
        torch.linalg.eigh(t @ t.T)
        torch.linalg.qr(t)
        torch.linalg.svd(t[:64])
    torch.sparse.mm(torch.eye(64, device="cuda").to_sparse_csr(), torch.randn(64, 8, device="cuda"))
    torch.cuda.synchronize()


def test_layer_by_layer_peak_cuda_memory_is_about_one_layer_not_the_model(calib_ids):
    """A 64-layer model (~150 MB fp32) compressed layer by layer on the GPU: the peak of CUDA memory above what
    the libraries hold is bounded by one layer's working set (the layer and its dense twin, their replacements,
    the layer's fp64 Grams and whitening, the activations of one batch), far below the model's size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, layers, vocab = 256, 512, 64, 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)).eval()
    recipe = load_recipe("svd-llm-20", ("calibration.nsamples=4", "calibration.seqlen=32"))
    ids = calib_ids(4, 32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    gram_bytes = 8 * (3 * h * h + i * i)  # q/k/v, o_proj and gate/up read width h; down_proj width i
    activation_bytes = ids.numel() * i * 4  # the widest hidden state of one batch (all 4 windows), fp32
    bound = 4 * layer_bytes + 6 * gram_bytes + 16 * activation_bytes + 24 * 2**20  # + workspaces, allocator slack
    assert bound < model_bytes / 2  # holding the model (or every layer's leftovers) would break the bound
    _warm_up_cuda_libraries()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    api.compress(model, recipe, batches=ids, device="cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert all(not p.is_cuda for p in model.parameters())
    assert peak < bound, (peak / 2**20, bound / 2**20, model_bytes / 2**20)
    assert torch.cuda.memory_allocated() - base < layer_bytes  # nothing left behind on the GPU


def test_lowrank_sparse_on_cuda_leaves_no_inference_copy_on_the_gpu(tiny_model, calib_ids):
    """The CSR copy each layer's forward builds on the GPU is dropped when the layer goes back to the offload
    device (issue 22: every layer's copy stayed on the GPU)."""
    from compressor.nn.modules import LowRankSparseLinear

    model = tiny_model("llama")
    recipe = load_recipe("lowrank-sparse-50", ("options.iterations=2", "calibration.nsamples=2",
                                               "calibration.seqlen=16"))
    _warm_up_cuda_libraries()
    base = torch.cuda.memory_allocated()
    api.compress(model, recipe, batches=calib_ids(2, 16), device="cuda")
    sparse = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
    assert len(sparse) == 14 and all(m._fast is None or not m._fast[2].is_cuda for m in sparse)
    # The 14 CSR copies would hold ~200 KB (a third of each row kept, 8 bytes per value with its column index)
    assert torch.cuda.memory_allocated() - base < 64 * 1024
