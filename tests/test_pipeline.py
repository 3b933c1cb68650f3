"""The whole pipeline on tiny models built in-process (Llama, Qwen2 with GQA + q/k/v bias, Mistral): compress with
every built-in recipe → save → load gives identical logits; nothing is left hooked; parameter counts follow the
recipe exactly; shared inputs share one Gram (and only those); whitened methods beat their unwhitened baselines;
`sequential.inputs` really changes what later layers see; precomputed statistics reproduce a run bit for bit;
target patterns; singular Grams give finite weights. Calibration is random token ids, no tokenizer."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import compressor
from compressor import api
from compressor.pipeline import compression as pipeline
from compressor.api import collect_statistics, compress
from compressor.errors import UserError
from compressor.nn.modules import LowRankLinear, LowRankSparseLinear, QuantLinear, prepare_inference
from compressor.recipe import load_recipe
from compressor.pipeline.stats import StatsCollector
from compressor.pipeline.targets import select_targets

from conftest import TINY_ARCHS, TINY_SIZES

RECIPES = ("svd-20", "svd-llm-20", "svd-llm-40", "asvd-20", "fwsvd-20", "rtn-4bit", "eora-4bit", "eora-gptq-4bit",
           "lowrank-sparse-50", "lowrank-20", "lowrank-40")
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LINEARS = ATTN + MLP
LAYERS = TINY_SIZES["num_hidden_layers"]
EVAL_IDS = torch.randint(0, TINY_SIZES["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(123))
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_backward_hooks", "_backward_pre_hooks")


def assert_gram_close(actual, expected):
    """Grams are fp32 products of chunks summed in fp64 (stats.GRAM_CHUNK): equal to single precision, measured
    against the diagonal scale √(G_ii G_jj) (entries near zero have no meaningful relative error)."""
    d = expected.diagonal().clamp(min=0).sqrt()
    assert ((actual - expected).abs() <= 1e-5 * d[:, None] * d[None, :] + 1e-12).all()


pytestmark = pytest.mark.usefixtures("one_thread")


def names(locals_=LINEARS, layers=range(LAYERS)) -> list[str]:
    return [f"model.layers.{i}.{local}" for i in layers for local in locals_]


@torch.no_grad()
def logits(model, ids=EVAL_IDS) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def by_name(result) -> dict:
    return {m.name: m for m in result.modules}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_no_hooks(model):
    left = {
        name: [d for d in HOOK_DICTS if getattr(module, d, None)]
        for name, module in model.named_modules()
    }
    assert {k: v for k, v in left.items() if v} == {}
    from torch.nn.modules import module as module_mod

    assert not module_mod._global_forward_hooks and not module_mod._global_forward_pre_hooks


def assert_untouched_outside_targets(model, dense):
    """Embeddings, lm_head, norms and every non-target parameter are the dense model's, bit for bit."""
    assert type(model.lm_head) is nn.Linear and type(model.get_input_embeddings()) is nn.Embedding
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        if ".self_attn." not in name and ".mlp." not in name:
            assert torch.equal(p, dense_params[name]), name


def bias_of(module):
    if isinstance(module, (LowRankLinear, LowRankSparseLinear)):
        return module.B.bias
    return module.bias


def capture_inputs(modules: dict[str, nn.Module]):
    """Forward pre-hooks recording the (flattened, fp64) input of each module; returns (store, handles)."""
    store: dict[str, list[torch.Tensor]] = {k: [] for k in modules}

    def hook(key):
        return lambda module, args: store[key].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in modules.items()]
    return store, handles


# ---------------------------------------------------------------------------------------------------------------
# compress → save → load, every built-in recipe on every architecture


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_recipe_roundtrips_with_identical_logits(tmp_path, tiny_model, calib_ids, arch, recipe):
    dense = tiny_model(arch)
    model = tiny_model(arch)
    decoder_cls = type(dense.model.layers[0])
    result = compress(model, recipe, batches=calib_ids())

    assert result.model is model and not model.training
    assert_no_hooks(model)
    assert all(type(layer) is decoder_cls for layer in model.model.layers)  # the input catcher is gone
    assert_untouched_outside_targets(model, dense)

    reports = by_name(result)
    assert sorted(reports) == sorted(names()) and len(result.modules) == len(reports)
    method = result.recipe.method
    kind = {"rtn": QuantLinear, "gptq": QuantLinear, "eora": QuantLinear,
            "lowrank-sparse": LowRankSparseLinear}.get(method, LowRankLinear)
    for name in names():
        module, original, report = model.get_submodule(name), dense.get_submodule(name), reports[name]
        m, n = original.weight.shape
        assert type(module) is kind, name
        assert report.compressed and report.spec == module.spec() and report.shape == (m, n)
        assert report.rel_output_error is not None and math.isfinite(report.rel_output_error)
        if method == "eora":  # default rank 64 is capped at min(m, n)
            assert module.spec() == {"kind": "quant", "bits": 4, "group_size": 128, "rank": min(64, m, n)}
        elif method == "rtn":
            assert module.spec() == {"kind": "quant", "bits": 4, "group_size": 128}
        elif method == "lowrank-sparse":  # half the parameters, shared between factors and sparse entries
            assert report.params_after <= report.params_before // 2 + (0 if original.bias is None else m)
        else:
            ratio = Fraction(str(result.recipe.options["param_ratio"]))
            assert module.rank == math.floor(ratio * m * n / (m + n))
        if original.bias is not None:  # Qwen2 q/k/v: the bias survives, exactly
            assert torch.equal(bias_of(module), original.bias)
        else:
            assert bias_of(module) is None

    expected = logits(model)
    assert torch.isfinite(expected).all()
    assert not torch.equal(expected, logits(dense))  # it really changed something
    out = result.save(tmp_path / "ckpt", report=None)
    assert (out / "recipe.yaml").is_file() and not (out / "report.json").exists()
    for loaded in (compressor.load_compressed(out), AutoModelForCausalLM.from_pretrained(out)):
        assert {n: m.spec() for n, m in loaded.named_modules() if isinstance(m, kind)} == result.specs()
        assert loaded.lm_head.weight.dtype == torch.float32
        assert torch.equal(logits(loaded), expected)


# ---------------------------------------------------------------------------------------------------------------
# parameter accounting


@pytest.mark.parametrize(
    "recipe, overrides, ratio",
    [("svd-20", [], "0.8"), ("svd-llm-40", [], "0.6"), ("svd-20", ["param_ratio=0.5"], "0.5"),
     ("svd-llm-20", ["param_ratio=0.35"], "0.35")],
)
def test_ranks_and_parameter_counts_follow_param_ratio(tiny_model, calib_ids, recipe, overrides, ratio):
    p = Fraction(ratio)
    r = load_recipe(recipe, overrides)
    assert r.options == {"param_ratio": float(ratio)}
    model = tiny_model("qwen2")
    model_before = count_params(model)
    result = compress(model, r, batches=calib_ids())

    total_mn = total_after = total_mn_plus = removed = 0
    for rep in result.modules:
        m, n = rep.shape
        module = model.get_submodule(rep.name)
        rank = math.floor(p * m * n / (m + n))
        bias = m if rep.name.endswith(("q_proj", "k_proj", "v_proj")) else 0  # Qwen2
        assert rep.compressed and module.rank == rank
        assert module.A.weight.shape == (rank, n) and module.B.weight.shape == (m, rank)
        assert rep.params_before == m * n + bias
        assert rep.params_after == rank * (m + n) + bias == sum(t.numel() for t in module.parameters())
        assert p * m * n - (m + n) < rank * (m + n) <= p * m * n  # floor: within one rank step below p·mn
        total_mn, total_mn_plus, total_after = total_mn + m * n, total_mn_plus + m + n, total_after + rank * (m + n)
        removed += rep.params_before - rep.params_after
    assert p * total_mn - total_mn_plus < total_after <= p * total_mn
    assert count_params(model) == model_before - removed  # the report counts what the model really holds


@pytest.mark.parametrize(
    "rank, compressed",
    [
        (22, {"self_attn.q_proj", "self_attn.o_proj", *MLP}),  # k/v (32x64): 22·96 = 2112 >= 2048 → dense
        (32, set(MLP)),  # q/o (64x64): 32·128 = 4096 == 4096 saves nothing → dense; k/v at their full rank 32
    ],
)
def test_fixed_rank_and_layers_that_would_grow_stay_dense(tmp_path, tiny_model, calib_ids, rank, compressed):
    recipe = load_recipe("svd-llm-20", [f"rank={rank}"])
    assert recipe.options == {"rank": rank}  # `--set rank=` replaces the recipe's param_ratio
    dense, model = tiny_model("qwen2"), tiny_model("qwen2")
    result = compress(model, recipe, batches=calib_ids())
    reports = by_name(result)
    assert sorted(reports) == sorted(names())
    for name in names():
        module, original, rep = model.get_submodule(name), dense.get_submodule(name), reports[name]
        m, n = original.weight.shape
        if name.split(".", 3)[-1] in compressed:
            assert type(module) is LowRankLinear and module.rank == rank and rep.compressed
            assert rep.params_after == rank * (m + n) + (0 if original.bias is None else m)
        else:
            assert type(module) is nn.Linear and not rep.compressed and rep.spec is None
            assert torch.equal(module.weight, original.weight)
            assert (module.bias is None) == (original.bias is None)
            if module.bias is not None:
                assert torch.equal(module.bias, original.bias)
            assert rep.params_after == rep.params_before
            assert "kept dense" in rep.note and f"{rank * (m + n):,}" in rep.note
    out = result.save(tmp_path / "ckpt", report=None)
    for loaded in (compressor.load_compressed(out), AutoModelForCausalLM.from_pretrained(out)):
        assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == len(compressed) * LAYERS
        assert torch.equal(logits(loaded), logits(model))


def test_a_fixed_rank_above_a_targets_smaller_dimension_is_refused_before_calibration(tiny_model, calib_ids):
    with pytest.raises(UserError, match=r"rank 33 exceeds min\(m, n\) = 32 of model.layers.0.self_attn.k_proj"):
        compress(tiny_model("qwen2"), load_recipe("svd-llm-20", ["rank=33"]), batches=calib_ids())


def test_param_ratio_rank_is_exact_where_the_budget_is_an_integer(calib_ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=TINY_SIZES["vocab_size"])
    model = LlamaForCausalLM(config).eval()
    result = compress(model, load_recipe("svd-20", ["param_ratio=0.7"]), batches=calib_ids(2, 8))
    for rep in result.modules:
        m, n = rep.shape
        assert rep.spec["rank"] == math.floor(Fraction("0.7") * m * n / (m + n)), (rep.name, m, n)  # gate: 21


def test_kept_dense_targets_count_their_bias_like_compressed_ones(tiny_model, calib_ids):
    model = tiny_model("qwen2")
    result = compress(model, load_recipe("svd-20", ["rank=22"]), batches=calib_ids())  # k/v dense, q compressed
    reports = by_name(result)
    for name in names(ATTN[:3]):  # all three carry a bias in Qwen2
        m, n = reports[name].shape
        assert reports[name].params_before == m * n + m, (name, reports[name].compressed)
    # and the report's "before" total is then the model's real target parameter count
    assert sum(r.params_before for r in result.modules) == sum(
        p.numel() for n in names() for p in tiny_model("qwen2").get_submodule(n).parameters())


# ---------------------------------------------------------------------------------------------------------------
# statistics: shared inputs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_inputs_share_one_gram_and_nothing_else_does(tiny_model, calib_ids, arch):
    """q/k/v read one tensor, gate/up another of the *same shape*; the collector keys inputs by data_ptr, so it
    must not mistake one for the other (or for o_proj's input, also 64 wide)."""
    model = tiny_model(arch)
    layer = model.model.layers[1]
    p = "model.layers.1."
    targets = {p + local: layer.get_submodule(local) for local in LINEARS}
    store, handles = capture_inputs(targets)
    collector = StatsCollector(targets, frozenset({"gram", "abs_mean"}))
    ids = calib_ids()
    try:
        for chunk in ids.split(2):
            collector.start_batch()
            model(input_ids=chunk, use_cache=False)
    finally:
        collector.remove()
        for h in handles:
            h.remove()
    assert_no_hooks(model)

    q, k, v, o, gate, up, down = (p + local for local in LINEARS)
    assert collector.groups() == {q: [q, k, v], o: [o], gate: [gate, up], down: [down]}
    assert set(collector.stats) == {q, o, gate, down}
    assert all(collector.for_module(x) is collector.stats[q] for x in (q, k, v))
    assert collector.for_module(up) is collector.stats[gate]
    for owner, readers in ((q, (q, k, v)), (o, (o,)), (gate, (gate, up)), (down, (down,))):
        X = torch.cat(store[owner])
        for reader in readers:  # the sharing is real: every reader saw exactly this input
            assert torch.equal(torch.cat(store[reader]), X)
        s = collector.stats[owner]
        assert s.count == X.shape[0] == ids.numel()
        # fp32 products per chunk, fp64 sum (stats.GRAM_CHUNK): single-precision agreement
        assert_gram_close(s.gram, X.T @ X)
        torch.testing.assert_close(s.abs_sum, X.abs().sum(0), rtol=1e-10, atol=1e-12)
    # The three 64-wide inputs are different data, and their Grams say so.
    for a, b in ((q, gate), (q, o), (o, gate)):
        assert rel(collector.stats[a].gram, collector.stats[b].gram) > 0.1


@pytest.mark.parametrize("batch_size", [1, 2, 8])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_collect_statistics_groups_every_layer_and_leaves_the_model_alone(tiny_model, calib_ids, arch, batch_size):
    """Through the real runner. Without the collector holding each input until the next batch, the allocator
    hands ln1's freed buffer to ln2's output in most of these configurations (measured), and gate/up would be
    merged into q's group with q's Gram: checked here on every layer against independently captured inputs."""
    ids = calib_ids()
    model, dense = tiny_model(arch), tiny_model(arch)
    stats = collect_statistics(model, ids, ["svd-llm-20"], batch_size=batch_size)
    assert_no_hooks(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
    assert stats.targets == tuple(tuple(names(layers=[i])) for i in range(LAYERS))
    assert len(stats.layers) == LAYERS
    for i, (groups, by_owner) in enumerate(stats.layers):
        q, k, v, o, gate, up, down = names(layers=[i])
        assert groups == {q: [q, k, v], o: [o], gate: [gate, up], down: [down]}
        assert set(by_owner) == {q, o, gate, down}
        assert by_owner[down].gram.shape == (128, 128) and by_owner[q].gram.dtype == torch.float64
        reference = _layer_input_grams(dense, ids, i)
        for owner, gram in reference.items():
            assert by_owner[owner].count == ids.numel()
            assert_gram_close(by_owner[owner].gram, gram)
        assert rel(by_owner[q].gram, by_owner[gate].gram) > 0.1


# ---------------------------------------------------------------------------------------------------------------
# quality: the whitened methods beat their baselines where inputs are correlated


def test_svd_llm_beats_svd_per_module_and_on_logits(tiny_model, calib_ids):
    ids = calib_ids(8, 32)
    dense = tiny_model("llama", correlated=True)
    svd = compress(tiny_model("llama", correlated=True), "svd-20", batches=ids)
    llm = compress(tiny_model("llama", correlated=True), "svd-llm-20", batches=ids)
    svd_r, llm_r = by_name(svd), by_name(llm)
    for name in names():
        assert llm_r[name].spec == svd_r[name].spec  # same budget
        # Measured: svd-llm/svd ≤ 0.58 for every module of this model.
        assert llm_r[name].rel_output_error < 0.8 * svd_r[name].rel_output_error, name
    # Measured whole-model logits error: svd 0.027, svd-llm 0.008.
    reference = logits(dense)
    assert rel(logits(llm.model), reference) < 0.5 * rel(logits(svd.model), reference)


def test_svd_llm_is_output_optimal_on_shared_dense_inputs(tiny_model, calib_ids):
    """With `sequential.inputs: dense` both runs see the same Grams: whitened truncation is the optimum of the
    output error, so it can only tie or win — on every module, on any model (here an uncorrelated one)."""
    ids = calib_ids()
    svd = by_name(compress(tiny_model("qwen2"), load_recipe("svd-20", ["sequential.inputs=dense"]), batches=ids))
    llm = by_name(compress(tiny_model("qwen2"), load_recipe("svd-llm-20", ["sequential.inputs=dense"]), batches=ids))
    for name in names():
        assert llm[name].rel_output_error <= svd[name].rel_output_error * (1 + 1e-9), name


def test_eora_beats_rtn_on_the_same_base(tiny_model, calib_ids):
    ids = calib_ids()
    rtn = compress(tiny_model("qwen2", correlated=True), "rtn-4bit", batches=ids)
    eora = compress(tiny_model("qwen2", correlated=True), load_recipe("eora-4bit", ["rank=8"]), batches=ids)
    rtn_r, eora_r = by_name(rtn), by_name(eora)
    for name in names():
        a, b = rtn.model.get_submodule(name), eora.model.get_submodule(name)
        # the base is the same RTN quantization (it depends on W only), plus a rank-8 residual
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.qzeros, b.qzeros) and torch.equal(a.scales, b.scales)
        assert b.rank == 8 and a.rank == 0
        m, n = rtn_r[name].shape
        assert eora_r[name].params_after == rtn_r[name].params_after + 8 * (m + n)
        assert eora_r[name].rel_output_error < 0.9 * rtn_r[name].rel_output_error, name
    dense = tiny_model("qwen2", correlated=True)
    assert rel(logits(eora.model), logits(dense)) < rel(logits(rtn.model), logits(dense))


def test_eora_at_full_rank_recovers_the_dense_model(tiny_model, calib_ids):
    ids = calib_ids()
    dense = tiny_model("llama")
    full = compress(tiny_model("llama"), load_recipe("eora-4bit", ["rank=128"]), batches=ids)
    rtn = compress(tiny_model("llama"), "rtn-4bit", batches=ids)
    for rep in full.modules:
        module, original = full.model.get_submodule(rep.name), dense.get_submodule(rep.name)
        assert module.rank == min(rep.shape)
        assert rep.rel_output_error < 1e-6, rep.name  # measured <= 4e-9
        torch.testing.assert_close(module.dense_weight(), original.weight.double(), rtol=0, atol=1e-7)  # 4e-10
    reference = logits(dense)
    prepare_inference(full.model, use_kernels=False)  # lrc's exact fp32 maths (the int4 kernel rounds to bf16)
    # Measured: full-rank EoRA 3e-7 relative logits error (fp32 round-off), RTN 4-bit alone 0.12.
    assert rel(logits(full.model), reference) < 1e-5
    assert rel(logits(rtn.model), reference) > 100 * rel(logits(full.model), reference)


# ---------------------------------------------------------------------------------------------------------------
# sequential inputs and precomputed statistics


def _record_grams(monkeypatch) -> dict:
    """Spy on compress_layer: {owner name: the Gram compress() handed it}."""
    seen: dict[str, torch.Tensor] = {}
    real = pipeline.compress_layer

    def spy(model, targets, groups, stats, method, options, allocated=None, **kw):
        for owner in groups:
            seen[owner] = stats[owner].gram.clone()
        return real(model, targets, groups, stats, method, options, allocated, **kw)

    monkeypatch.setattr(pipeline, "compress_layer", spy)
    return seen


def _layer_input_grams(model, ids, layer: int) -> dict[str, torch.Tensor]:
    """Grams of what the 4 input-owning linears of `layer` read when `model` runs on `ids`."""
    owners = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    modules = {f"model.layers.{layer}.{o}": model.model.layers[layer].get_submodule(o) for o in owners}
    store, handles = capture_inputs(modules)
    try:
        logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).T @ torch.cat(v) for k, v in store.items()}


def test_sequential_inputs_dense_vs_compressed(tiny_model, calib_ids, monkeypatch):
    ids = calib_ids()
    seen = {}
    models = {}
    for inputs in ("dense", "compressed"):
        seen[inputs] = _record_grams(monkeypatch)
        models[inputs] = tiny_model("llama", correlated=True)
        compress(models[inputs], load_recipe("svd-llm-40", [f"sequential.inputs={inputs}"]), batches=ids)
        monkeypatch.undo()
    dense_model = tiny_model("llama", correlated=True)
    layer0 = [n for n in seen["dense"] if ".layers.0." in n]
    layer1 = [n for n in seen["dense"] if ".layers.1." in n]
    assert len(layer0) == len(layer1) == 4 and seen["dense"].keys() == seen["compressed"].keys()
    for owner in layer0:  # nothing upstream is compressed yet: identical
        assert torch.equal(seen["dense"][owner], seen["compressed"][owner]), owner
    # Layer 1 under "dense" sees the dense model's activations; under "compressed" those of the model with layer 0
    # already compressed (so it can absorb layer 0's error). The q/gate/o/down inputs all differ.
    # Layer 1's statistics are gathered before layer 1 itself is compressed: the reference is compressed layer 0
    # followed by the dense layer 1.
    hybrid = tiny_model("llama", correlated=True)
    hybrid.model.layers[0] = models["compressed"].model.layers[0]
    expect = {"dense": _layer_input_grams(dense_model, ids, 1), "compressed": _layer_input_grams(hybrid, ids, 1)}
    for owner in layer1:
        assert_gram_close(seen["dense"][owner], expect["dense"][owner])
        assert_gram_close(seen["compressed"][owner], expect["compressed"][owner])
        # Measured relative difference between the two: 3.3e-3 (q, gate) to 2.3e-2 (o_proj).
        assert rel(seen["compressed"][owner], seen["dense"][owner]) > 1e-3, owner


def test_precomputed_statistics_reproduce_a_dense_inputs_run_exactly(tiny_model, calib_ids, monkeypatch):
    ids = calib_ids()
    svdllm = load_recipe("svd-llm-20", ["sequential.inputs=dense"])
    eora = load_recipe("eora-4bit", ["sequential.inputs=dense", "rank=8"])
    stats = collect_statistics(tiny_model("qwen2"), ids, [svdllm, eora])  # one pass for both recipes
    for recipe in (svdllm, eora):
        direct = compress(tiny_model("qwen2"), recipe, batches=ids)
        with monkeypatch.context() as mp:  # reusing statistics must not run a single forward pass
            mp.setattr(pipeline, "run_sequential", lambda *a, **k: pytest.fail("calibration pass with statistics given"))
            reused = compress(tiny_model("qwen2"), recipe, statistics=stats)
        a, b = direct.model.state_dict(), reused.model.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
        strip = lambda r: {**r.to_dict(), "seconds": 0}  # noqa: E731
        assert [strip(r) for r in direct.modules] == [strip(r) for r in reused.modules]


# ---------------------------------------------------------------------------------------------------------------
# target selection


@pytest.mark.parametrize(
    "targets, ignore, expected",
    [
        (["*q_proj"], [], {0: ["self_attn.q_proj"], 1: ["self_attn.q_proj"]}),
        ([r"re:mlp\.(gate|up)_proj"], [], {0: ["mlp.gate_proj", "mlp.up_proj"], 1: ["mlp.gate_proj", "mlp.up_proj"]}),
        (["*"], ["*.mlp.*"], {0: list(ATTN), 1: list(ATTN)}),
        (["*"], [r"re:^self_attn\.[kv]_proj$"], {i: [x for x in LINEARS if x[-6] not in "kv"] for i in (0, 1)}),
        (["self_attn.o_proj", "*down_proj"], [], {0: ["self_attn.o_proj", "mlp.down_proj"],
                                                   1: ["self_attn.o_proj", "mlp.down_proj"]}),
        (["*"], [r"re:layers\.0\."], {0: [], 1: list(LINEARS)}),
        (["*"], [], {0: list(LINEARS), 1: list(LINEARS)}),  # "*": lm_head and embeddings never selected
    ],
)
def test_target_patterns(tiny_model, targets, ignore, expected):
    model = tiny_model("qwen2")
    selected = select_targets(model, targets, ignore)
    assert [list(layer) for layer in selected] == [names(expected[i], [i]) for i in range(LAYERS)]
    assert all(type(m) is nn.Linear for layer in selected for m in layer.values())


@pytest.mark.parametrize(
    "targets, ignore, message",
    [
        (["*q_proj", "*qkv_proj"], [], "'*qkv_proj' matches no linear"),
        (["lm_head"], [], "'lm_head' matches no linear"),
        (["*lm_head"], [], "matches no linear"),
        (["re:embed"], [], "matches no linear"),
        (["*"], ["*proj"], "leave no linear layer"),
        (["re:(q_proj"], [], "invalid regex"),
    ],
)
def test_bad_target_patterns_are_user_errors(tiny_model, calib_ids, targets, ignore, message):
    model, dense = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(UserError, match=message.replace("*", r"\*").replace("(", r"\(")):
        select_targets(model, targets, ignore)
    overrides = [f"targets={targets!r}", f"ignore={ignore!r}"]
    with pytest.raises(UserError):
        compress(model, load_recipe("svd-20", overrides), batches=calib_ids())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))


def test_compress_touches_only_selected_targets(tmp_path, tiny_model, calib_ids):
    recipe = load_recipe(
        "svd-llm-20", [r"targets=['re:mlp\.(gate|up)_proj', '*o_proj']", r"ignore=['re:layers\.1\.self_attn']"]
    )
    dense, model = tiny_model("qwen2"), tiny_model("qwen2")
    result = compress(model, recipe, batches=calib_ids())
    chosen = names(("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"), [0])
    chosen += names(("mlp.gate_proj", "mlp.up_proj"), [1])
    assert sorted(by_name(result)) == sorted(chosen)
    for name in names():
        module = model.get_submodule(name)
        if name in chosen:
            assert type(module) is LowRankLinear
        else:
            assert type(module) is nn.Linear and torch.equal(module.weight, dense.get_submodule(name).weight)
    assert_untouched_outside_targets(model, dense)
    out = result.save(tmp_path / "ckpt", report=None)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model))


# ---------------------------------------------------------------------------------------------------------------
# singular Grams


def _assert_finite(model):
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert bad == []
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("recipe", ["svd-llm-20", "eora-4bit"])
def test_dead_input_channel_gives_finite_weights_and_counted_clamps(tiny_model, calib_ids, recipe):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 0  # channel 5 of layer 0's q/k/v input is always zero
    result = compress(model, recipe, batches=calib_ids())
    _assert_finite(model)
    for rep in result.modules:
        assert math.isfinite(rep.rel_weight_error) and math.isfinite(rep.rel_output_error)
    dense = tiny_model("llama")
    for name in names(ATTN[:3], [0]):
        (m, n), clamped = by_name(result)[name].shape, by_name(result)[name].clamped_eigenvalues
        # a wide target (GQA's k/v) is solved in output space: nothing to clamp (compressor/linalg.whitened_svd)
        assert clamped >= 1 if m >= n else clamped == 0, name
        # no blow-up through the clamped direction: the reconstruction stays at the dense weight's scale
        w = dense.get_submodule(name).weight.abs().max()
        assert model.get_submodule(name).dense_weight().abs().max() < 3 * w, name


@pytest.mark.parametrize("recipe", ["svd-llm-20", "eora-4bit"])
def test_fewer_tokens_than_features_gives_finite_weights(tiny_model, calib_ids, recipe):
    model = tiny_model("qwen2")
    result = compress(model, recipe, batches=calib_ids(1, 8))  # 8 tokens: every Gram has rank <= 8 < 64
    _assert_finite(model)
    for rep in result.modules:
        m, n = rep.shape
        assert rep.clamped_eigenvalues >= n - 8 if m >= n else rep.clamped_eigenvalues == 0, rep.name
        # Every rank here (>= 8 for the residual, >= 17 for the factors) covers the span of the 8 calibration
        # tokens, so the output error on them is ~0 (measured <= 4e-4; the clamped floor is the rest).
        assert math.isfinite(rep.rel_output_error) and rep.rel_output_error < 1e-2, rep.name
