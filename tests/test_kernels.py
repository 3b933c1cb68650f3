"""Packed kernels (compressor/nn/kernels.py) and the compressed modules' fast forward paths.

Tolerances: torch's CPU int4/int8 kernels take bf16 activations, scales and zeros only, and return bf16. A
reference that rounds exactly those to bf16, multiplies in fp64 and rounds the product to bf16 must match the kernel
to one bf16 ulp (measured: bit for bit): that proves the layout conversion (zero points z' = (8 − z)·s, group
re-expression, int8 offsets) exact. Against lrc's fp32 dequantise path the difference is only those roundings:
each rounded value is off by at most 2⁻⁹ relative (bf16's unit roundoff), and four enter each output (x, s, z', y),
so the output's relative error is below 4·2⁻⁹ ≈ 7.8e-3 (measured 2–3e-3 on random data).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from compressor import quant
from compressor.nn import kernels
from compressor.nn.factors import LowRank, Quantized
from compressor.nn.modules import QuantLinear, module_from_factors, prepare_inference

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_TOL = 4 * 2**-9


def _quantized(m, n, bits, group_size, seed=0, rank=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    s, z = quant.rtn_params(W, bits, group_size, False)
    q = quant.quantize(W, s, z, bits, group_size)
    residual = (LowRank(torch.randn(rank, n, generator=g) * 0.1, torch.randn(m, rank, generator=g) * 0.1)
                if rank else None)
    return Quantized.from_codes(q, s, z, bits, group_size, residual)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _bf16_reference(x, factors: Quantized, packed: kernels.Packed):
    """The kernel's product with exactly its roundings: x, scales and zeros to bf16, fp64 products, bf16 result;
    int8: plus the zero points' offset term in fp32."""
    n = factors.in_features
    q = quant.unpack(factors.qweight, factors.bits, n).double()
    if packed.kind == "int4":
        q = q + 8 - 2 ** (factors.bits - 1)  # narrower codes shifted to the middle of the int4 range
    xb = x.to(torch.bfloat16).double()
    if packed.kind == "int8":
        product = xb @ ((q - 2 ** (factors.bits - 1)) * packed.scales.double()[:, None]).T
        return product.to(torch.bfloat16).float() + x.sum(-1, keepdim=True) * packed.offset
    sz = packed.scales.double()  # (K/g, N, 2)
    s = sz[..., 0].T.repeat_interleave(packed.group, dim=1)
    z = sz[..., 1].T.repeat_interleave(packed.group, dim=1)
    return (xb @ ((q - 8) * s + z).T).to(torch.bfloat16).float()


@pytest.mark.parametrize("bits,group_size,n,m", [
    (4, 128, 576, 64),   # SmolLM2's hidden size: a ragged last group of 64, re-expressed as g = 64
    (4, 128, 256, 48),
    (4, 32, 96, 16),
    (4, 256, 512, 32),
    (8, 1024, 576, 64),  # one group per row: int8 per output channel
    (8, 96, 96, 32),
    (3, 128, 576, 64),   # 3- and 2-bit codes are 4-bit codes with the top values unused: the int4 kernel, exactly
    (2, 64, 256, 32),
    (6, 576, 576, 32),   # 5-7 bits with one group per row: q − 128 fits the int8 kernel
    (5, 2048, 576, 16),
])
def test_packed_kernel_equals_its_bf16_reference_and_the_dequantise_path(bits, group_size, n, m):
    factors = _quantized(m, n, bits, group_size)
    packed = kernels.pack(factors.qweight, factors.qzeros, factors.scales, bits, group_size, n, "cpu")
    assert packed.kind == ("int4" if bits <= 4 else "int8")
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(1))
    y = kernels.matmul(x, packed)
    assert y.dtype == torch.float32 and y.shape == (7, m)
    reference = _bf16_reference(x, factors, packed)
    assert ((y - reference).abs() <= torch.finfo(torch.bfloat16).eps * reference.abs() + 1e-6).all()
    assert _rel(y, x.double() @ factors.dequantized().double().T) < BF16_TOL
    # batched input shapes pass through
    assert torch.equal(kernels.matmul(x.reshape(7, 1, n), packed).reshape(7, m), y)


@pytest.mark.parametrize("bits,group_size,n,m,why", [
    (3, 100, 200, 32, "32/64/128/256"), (4, 100, 200, 32, "32/64/128/256"), (4, 128, 256, 40, "divisible by 16"),
    (8, 64, 256, 32, "several groups"), (6, 128, 256, 32, "no 6-bit"), (5, 128, 576, 32, "no 5-bit"),
])
def test_layouts_without_a_kernel_say_why(bits, group_size, n, m, why):
    reason = kernels.fallback_reason(bits, group_size, n, m, "cpu")
    assert reason and why in reason
    with pytest.raises(ValueError, match=why):
        factors = _quantized(m, n, bits, group_size)
        kernels.pack(factors.qweight, factors.qzeros, factors.scales, bits, group_size, n, "cpu")


@pytest.mark.parametrize("bits,group_size,n,rank", [(4, 128, 192, 0), (4, 64, 128, 8), (8, 512, 128, 4),
                                                    (3, 128, 576, 0), (2, 64, 128, 4), (6, 128, 128, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_kernel_path_matches_the_dequantise_path(bits, group_size, n, rank, dtype):
    factors = _quantized(48, n, bits, group_size, rank=rank)
    module = module_from_factors(factors, torch.randn(48), dtype).eval()
    assert module.prepare() == ("int4" if bits <= 4 else "int8")
    x = torch.randn(2, 5, n, dtype=dtype, generator=None)
    with torch.no_grad():
        y = module(x)
        ref = module.dequantized_forward(x) + (module.lora_B(module.lora_A(x)) if rank else 0)
    assert y.dtype == dtype
    assert _rel(y, ref) < (BF16_TOL if dtype == torch.float32 else 2 * BF16_TOL)
    # int4: half a byte per weight + bf16 scales/zeros; int8: a byte + bf16 scale and fp32 offset per row
    assert module.kernel_bytes() <= 48 * n / (2 if bits <= 4 else 1) + 48 * (4 * n // 32 if bits <= 4 else 6)


def test_fallback_warns_once_and_is_chunked_exactly():
    factors = _quantized(64, 256, 5, 128)
    module = module_from_factors(factors, None, torch.float32).eval()
    x = torch.randn(3, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with torch.no_grad():
            y, y2 = module(x), module(x)
    assert len([w for w in caught if "dequantise" in str(w.message)]) == 1
    assert "5-bit" in str(caught[0].message)
    assert torch.equal(y, y2)
    # several row blocks dequantised, then one product: what nn.Linear with the dequantised weight computes
    assert torch.equal(y, torch.nn.functional.linear(x, module.dequantized_weight()))
    rows = kernels.fallback_rows(256, 64, 5, 4)
    assert rows < 64  # several chunks: the temporaries stay under half the dense layer's bytes
    assert rows * 256 * (8 * 5 + 16) <= 64 * 256 * 4 / 2 or rows == 16


def test_reference_path_rounds_as_one_linear_whatever_its_row_blocks():
    """The demo model's gate_proj shape, 3 bits: the weight is dequantised in 38-row blocks; per-block products
    (the old path) differed from one nn.Linear by 1.4e-5 here, which is what a serving export computes."""
    module = module_from_factors(_quantized(768, 256, 3, 128), None, torch.float32).eval()
    module.use_kernel = False  # lrc's exact reference path (prepare_inference(use_kernels=False))
    assert kernels.fallback_rows(256, 768, 3, 4) < 768
    x = torch.randn(1, 64, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(module(x), torch.nn.functional.linear(x, module.dequantized_weight()))


def test_gradients_through_x_take_the_dequantise_path():
    module = module_from_factors(_quantized(32, 128, 4, 64), None, torch.float32)
    x = torch.randn(4, 128, requires_grad=True)
    module(x).sum().backward()
    torch.testing.assert_close(x.grad, module.dequantized_weight().sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


def test_state_dict_is_unchanged_by_the_kernel_copy_and_reload_reconverts():
    module = module_from_factors(_quantized(32, 128, 4, 64), torch.randn(32), torch.float32).eval()
    keys = set(module.state_dict())
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = module(x)
    assert set(module.state_dict()) == keys and module.kernel_bytes() > 0
    other = module_from_factors(_quantized(32, 128, 4, 64, seed=5), torch.randn(32), torch.float32).eval()
    with torch.no_grad():
        other(x)  # converted from other codes first
        other.load_state_dict(module.state_dict())
        assert torch.equal(other(x), y)


def test_compressed_model_save_load_same_logits(tiny_model, calib_ids, tmp_path):
    from compressor import api

    model = tiny_model("llama")
    result = api.compress(model, "rtn-4bit", batches=calib_ids(2, 16))
    assert all(m.prepare() == "int4" for m in model.modules() if isinstance(m, QuantLinear))
    ids, before, loaded = _logits_then_reload(model, result, tmp_path)
    quant_modules = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert quant_modules and all(m._packed is not None for m in quant_modules)  # converted at load time
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,group_size,n", [(4, 128, 512), (4, 64, 576), (8, 1024, 256), (3, 128, 512),
                                               (6, 1024, 256)])
def test_cuda_packed_kernels(bits, group_size, n):
    factors = _quantized(64, n, bits, group_size)
    module = module_from_factors(factors, None, torch.bfloat16).cuda().eval()
    assert module.prepare() == ("int4" if bits <= 4 else "int8")
    x = torch.randn(3, n, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert _rel(module(x).float(), module.dequantized_forward(x).float()) < 2 * BF16_TOL


def _lowrank_sparse(m, n, rank, density, fmt="indices", seed=0):
    from compressor.nn.modules import LowRankSparseLinear

    g = torch.Generator().manual_seed(seed)
    k = max(1, int(density * n))
    module = LowRankSparseLinear(n, m, rank, True, nnz_per_row=k, fmt="indices")
    with torch.no_grad():
        module.A.weight.copy_(torch.randn(rank, n, generator=g) / n**0.5)
        module.B.weight.copy_(torch.randn(m, rank, generator=g) / rank**0.5)
        module.B.bias.copy_(torch.randn(m, generator=g))
        module.S_values.copy_(torch.randn(m, k, generator=g))
        module.S_indices.copy_(torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(m)]))
    return module.eval()


@pytest.mark.parametrize("density,path", [(0.02, "csr"), (0.3, "merged")])
def test_lowrank_sparse_fast_paths_match_densify(density, path):
    module = _lowrank_sparse(96, 128, 8, density)
    x = torch.randn(3, 4, 128)
    with torch.no_grad():
        module.use_kernel = False
        reference = module(x)  # densify per forward
        module.use_kernel = True
        assert module.prepare() == path
        y = module(x)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    assert module.kernel_bytes() > 0 and "_fast" not in str(list(module.state_dict()))


def test_lowrank_sparse_cache_follows_weight_updates_and_training():
    module = _lowrank_sparse(32, 64, 4, 0.3)
    module.prepare()
    x = torch.randn(2, 64)
    with torch.no_grad():
        stale = module(x)
        module.S_values.mul_(2)  # an in-place update (optimizer step, load_state_dict) bumps the version
        y = module(x)
        module.use_kernel = False  # the densify path
        torch.testing.assert_close(y, module(x), rtol=1e-5, atol=1e-5)
        module.use_kernel = True
        assert (y - stale).abs().max() > 0.1
    module.prepare()
    out = module(x.requires_grad_())  # grad enabled: the differentiable densify path
    out.sum().backward()
    assert module.S_values.grad is not None and module.A.weight.grad is not None


def test_lowrank_sparse_checkpoint_roundtrip_same_logits(tiny_model, calib_ids, tmp_path):
    from compressor import api
    from compressor.nn.modules import LowRankSparseLinear
    from compressor.recipe import load_recipe

    model = tiny_model("llama")
    result = api.compress(model, load_recipe("lowrank-sparse-50", ["options.iterations=2"]), batches=calib_ids(2, 16))
    ids, before, loaded = _logits_then_reload(model, result, tmp_path)
    sparse = [m for m in loaded.modules() if isinstance(m, LowRankSparseLinear)]
    assert sparse and all(m._fast is not None for m in sparse)  # prepared at load time
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    prepare_inference(loaded, use_kernels=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_rank_multiple_rounds_down_within_the_budget():
    from compressor.methods.svd import SVDOptions
    from compressor.budget.rank import resolve_rank, round_rank

    assert [round_rank(r, 8) for r in (5, 8, 15, 16, 172, None)] == [5, 8, 8, 16, 168, None]
    plain = resolve_rank(576, 576, SVDOptions(param_ratio=0.6))[0]
    aligned = resolve_rank(576, 576, SVDOptions(param_ratio=0.6, rank_multiple=8))[0]
    assert plain == 172 and aligned == 168
    assert resolve_rank(192, 576, SVDOptions(size_ratio=0.6, rank_multiple=64))[0] == 64  # 86 -> 64


def test_fuse_siblings_shares_one_A_gemm_with_the_same_logits(tiny_model, calib_ids, tmp_path):
    from compressor import api
    from compressor.nn.modules import LowRankLinear, fuse_siblings

    model = tiny_model("qwen2")  # GQA and q/k/v biases
    result = api.compress(model, "svd-20", batches=calib_ids(2, 16))
    out = result.save(tmp_path / "out")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups = fuse_siblings(model)
    assert sorted(len(g) for g in groups) == [2, 2, 3, 3]  # per layer [q, k, v] and [gate, up]
    assert {n.rsplit(".", 1)[1] for g in groups for n in g} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    calls = []
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.A.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        fused = model(ids).logits
    assert len(calls) == 4  # only o_proj and down_proj still call their own A (2 layers)
    torch.testing.assert_close(fused, before, rtol=1e-5, atol=1e-5)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    loaded = api.load_compressed(out, fuse_siblings=True)
    assert sum(m._shared is not None for m in loaded.modules() if isinstance(m, LowRankLinear)) == 10
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-5, atol=1e-5)
        # a factor changed in place (training, load_state_dict) is concatenated again
        loaded.model.layers[0].self_attn.k_proj.A.weight.mul_(0)
        unfused = api.load_compressed(out)
        unfused.model.layers[0].self_attn.k_proj.A.weight.mul_(0)
        torch.testing.assert_close(loaded(ids).logits, unfused(ids).logits, rtol=1e-5, atol=1e-5)


def test_lowrank_factors_transposed_at_load_save_row_major(tiny_model, calib_ids, tmp_path):
    from safetensors.torch import load_file

    from compressor import api
    from compressor.nn.modules import LowRankLinear

    model = tiny_model("llama")
    result = api.compress(model, "svd-20", batches=calib_ids(2, 16))
    stored = load_file(result.save(tmp_path / "out") / "model.safetensors")
    loaded = api.load_compressed(tmp_path / "out")
    lowrank = [m for m in loaded.modules() if isinstance(m, LowRankLinear)]
    assert lowrank and all(m.A.weight.T.is_contiguous() and not m.A.weight.is_contiguous() for m in lowrank)
    state = loaded.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    resaved = api.load_compressed(loaded.save_pretrained(tmp_path / "again") or tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(resaved(ids).logits, loaded(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["svd-20", "rtn-4bit"])
def test_torch_compile_of_a_loaded_model_matches_eager(tiny_model, calib_ids, tmp_path, recipe):
    """The vLLM-free fast path: transformers + lrc modules + torch.compile (inductor; ~1-2 min per model on CPU)."""
    from compressor import api

    result = api.compress(tiny_model("llama"), recipe, batches=calib_ids(2, 16))
    loaded = api.load_compressed(result.save(tmp_path / "out"))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = loaded(ids).logits
        compiled = torch.compile(loaded)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def _logits_then_reload(model, result, tmp_path):
    """(ids, the compressed model's logits on them, the model saved and loaded back by load_compressed)."""
    from compressor import api

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    return ids, before, api.load_compressed(result.save(tmp_path / "out"))


# Torch builds without a kernel's ops (pyproject allows torch builds older than the CPU int4 ops, ~2.6) or a GPU
# that cannot run them (CUDA int4 needs sm80+): loading still works, on the exact dequantise path, warned once.

CPU_INT4_OPS = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")


class _AtenWithout:
    """torch.ops.aten as a torch build without the ops `names` shows it: looking one up raises AttributeError."""

    def __init__(self, aten, names):
        self._aten, self._names = aten, names

    def __getattr__(self, name):
        if name in self._names:
            raise AttributeError(f"'_OpNamespace' 'aten' object has no attribute '{name}'")
        return getattr(self._aten, name)


def _without_ops(monkeypatch, names):
    real = torch._C._dispatch_has_kernel_for_dispatch_key

    def has_kernel(op, key):  # what torch does for an operator it does not know
        if op.removeprefix("aten::") in names:
            raise RuntimeError(f"operator {op} does not exist")
        return real(op, key)

    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", has_kernel)
    monkeypatch.setattr(torch.ops, "aten", _AtenWithout(torch.ops.aten, names))


def test_a_torch_without_the_cpu_int4_ops_loads_a_4bit_checkpoint_on_the_dequantise_path(
        tiny_model, calib_ids, tmp_path, monkeypatch):
    from compressor import api

    result = api.compress(tiny_model("llama"), "rtn-4bit", batches=calib_ids(2, 16))
    out = result.save(tmp_path / "out")
    reference = api.load_compressed(out)
    prepare_inference(reference, use_kernels=False)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    _without_ops(monkeypatch, CPU_INT4_OPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        loaded = api.load_compressed(out)
        with torch.no_grad():
            logits, again = loaded(ids).logits, loaded(ids).logits
    quant_modules = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(quant_modules) == 14 and all(m.prepare() == "dequantize" for m in quant_modules)
    with torch.no_grad():
        assert torch.equal(logits, reference(ids).logits) and torch.equal(again, logits)
    fallbacks = [str(w.message) for w in caught if "_weight_int4pack_mm_for_cpu" in str(w.message)]
    assert len(fallbacks) == 1 and "\n" not in fallbacks[0], fallbacks


def test_a_torch_without_the_int8_op_takes_the_dequantise_path(monkeypatch):
    module = module_from_factors(_quantized(32, 256, 8, 256), torch.randn(32), torch.float32).eval()
    x = torch.randn(3, 256)
    _without_ops(monkeypatch, ("_weight_int8pack_mm",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with torch.no_grad():
            y = module(x)
            assert torch.equal(module(x), y)
    assert module.prepare() == "dequantize"
    assert torch.equal(y, module.dequantized_forward(x))
    assert len([w for w in caught if "_weight_int8pack_mm" in str(w.message)]) == 1


def test_cuda_int4_needs_compute_capability_8(monkeypatch):
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    reason = kernels.fallback_reason(4, 128, 512, 64, "cuda")
    assert reason is not None and "8.0" in reason and "7.5" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert kernels.fallback_reason(4, 128, 512, 64, "cuda") is None
