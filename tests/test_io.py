"""Compressed checkpoints: save → load (lrc's loader and plain transformers) gives identical logits, the format is
strict, writes are atomic, and the files really are smaller. Tiny models built in-process from configs."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from compressor import quant
from compressor.nn import hf_integration
from compressor.errors import UserError
from compressor.nn.factors import LowRank, Quantized
from compressor.io.checkpoint import checkpoint_bytes, load_compressed, save_compressed
from compressor.nn.modules import LowRankLinear, QuantLinear, module_from_factors

SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256,
)
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS = ATTN + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INPUT = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def build(arch: str, tie: bool = False):
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=tie))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=tie))
        with torch.no_grad():  # random init leaves biases at zero: make the bias path visible in the logits
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    return model.eval()


def lowrank_of(w: torch.Tensor, rank: int) -> LowRank:
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return LowRank(A=s[:rank, None] * vh[:rank], B=u[:, :rank])


def quantized_of(w: torch.Tensor, bits: int, group_size: int, rank: int = 0) -> Quantized:
    w = w.detach().float()
    scale, zero = quant.rtn_params(w, bits, group_size, symmetric=False)
    q = quant.quantize(w, scale, zero, bits, group_size)
    base = Quantized.from_codes(q, scale, zero, bits, group_size)
    residual = lowrank_of(w - base.dequantized(), rank) if rank else None
    return Quantized.from_codes(q, scale, zero, bits, group_size, residual)


def compress(model, plan: dict[str, callable]):
    """Swap each named linear for the module built from `plan[name](weight)`."""
    for name, make in plan.items():
        old = model.get_submodule(name)
        bias = old.bias.detach() if old.bias is not None else None
        new = module_from_factors(make(old.weight), bias, old.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def mixed_plan() -> dict:
    """Every module kind: low rank, 4-bit + EoRA residual, 3-bit plain, ragged group (in=128 with group 48)."""
    return {
        "model.layers.0.self_attn.q_proj": lambda w: lowrank_of(w, 12),
        "model.layers.0.self_attn.k_proj": lambda w: quantized_of(w, 4, 32, rank=8),
        "model.layers.0.self_attn.v_proj": lambda w: quantized_of(w, 3, 32),
        "model.layers.1.mlp.up_proj": lambda w: lowrank_of(w, 20),
        "model.layers.1.mlp.down_proj": lambda w: quantized_of(w, 3, 48, rank=4),
    }


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(INPUT).logits


def specs(model) -> dict:
    return {n: (type(m), m.spec()) for n, m in model.named_modules() if isinstance(m, (LowRankLinear, QuantLinear))}


def save(model, out, **kw):
    kw.setdefault("method", "svd")
    kw.setdefault("recipe_name", "test-recipe")
    return save_compressed(model, out, **kw)


def weight_data_bytes(path) -> int:
    """Tensor bytes of a checkpoint's safetensors files, without the JSON headers."""
    total = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (header,) = struct.unpack("<Q", fh.read(8))
        total += f.stat().st_size - 8 - header
    return total


@contextlib.contextmanager
def transformers_warnings():
    """Collect what transformers logs at WARNING or above (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", False), ("llama", True)])
def test_roundtrip_identical_logits(tmp_path, arch, tie):
    model = compress(build(arch, tie), mixed_plan())
    expected, expected_specs = logits(model), specs(model)
    out = save(model, tmp_path / "out")

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "lrc" and qc["method"] == "svd" and qc["recipe"] == "test-recipe"
    assert qc["modules"] == {n: s for n, (_, s) in expected_specs.items()}
    assert config["tie_word_embeddings"] is tie  # the head is dense here, so tying is kept

    with transformers_warnings() as warned:
        plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)  # no trust_remote_code
    assert warned == []
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}

    for loaded in (load_compressed(out), plain):
        assert specs(loaded) == expected_specs
        assert set(loaded.state_dict()) == set(model.state_dict())
        assert torch.equal(logits(loaded), expected)
        k = loaded.model.layers[0].self_attn.k_proj
        assert k.qweight.dtype == torch.int32 and k.qzeros.dtype == torch.int32 and k.scales.dtype == torch.float16
        if arch == "qwen2":
            assert loaded.model.layers[0].self_attn.q_proj.B.bias is not None and k.bias is not None
        if tie:
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert leftovers(tmp_path) == []


def test_compressed_tied_head_unties(tmp_path):
    """Compressing the output embedding of a tied model: the input embedding stays dense and both load."""
    model = compress(build("llama", tie=True), {"lm_head": lambda w: lowrank_of(w, 16), **mixed_plan()})
    expected = logits(model)
    out = save(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert isinstance(loaded.lm_head, LowRankLinear)
    assert torch.equal(logits(loaded), expected)


def test_bf16_load_keeps_int_and_fp16_buffers(tmp_path):
    out = save(compress(build("qwen2"), mixed_plan()), tmp_path / "out")
    model = load_compressed(out, dtype=torch.bfloat16)
    k = model.model.layers[0].self_attn.k_proj
    assert (k.qweight.dtype, k.scales.dtype, k.lora_A.weight.dtype, k.bias.dtype) == (
        torch.int32, torch.float16, torch.bfloat16, torch.bfloat16
    )
    assert model.model.layers[0].self_attn.q_proj.A.weight.dtype == torch.bfloat16
    assert torch.isfinite(logits(model).float()).all()


def test_checkpoint_is_smaller_in_proportion(tmp_path):
    dense = build("llama")
    dense.save_pretrained(tmp_path / "dense")
    names = [f"model.layers.{i}.{lin}" for i in range(2) for lin in LINEARS]
    linear_bytes = sum(dense.get_submodule(n).weight.nbytes for n in names)  # 69% of this tiny model
    other_bytes = weight_data_bytes(tmp_path / "dense") - linear_bytes  # embeddings, head, norms: stay fp32

    def saved(plan, name):
        model = compress(build("llama"), {n: plan for n in names})
        out = save(model, tmp_path / name)
        # Exactly the model's tensors are written: no dense copies, no duplicates.
        assert weight_data_bytes(out) == sum(t.nbytes for t in model.state_dict().values())
        linear_ratio = (weight_data_bytes(out) - other_bytes) / linear_bytes
        return linear_ratio, checkpoint_bytes(out) / checkpoint_bytes(tmp_path / "dense")

    # Low rank at half the parameters of every linear (r(m+n) <= mn/2): linears' bytes = their parameters.
    linear, whole = saved(lambda w: lowrank_of(w, w.shape[0] * w.shape[1] // (2 * sum(w.shape))), "lowrank")
    assert linear == pytest.approx(0.4913, abs=1e-4)  # ranks round down: 0.491 of the linears' parameters
    assert 0.63 < whole < 0.67  # measured 0.654

    # RTN with groups of 32: 4 (3) bits per weight + 16-bit scale and packed zero per group ≈ 4.9 (3.9) bits.
    linear4, whole4 = saved(lambda w: quantized_of(w, 4, 32), "q4")
    assert 0.14 < linear4 < 0.16  # measured 0.1545 = 4.94 / 32
    assert 0.40 < whole4 < 0.45  # measured 0.426
    linear3, _ = saved(lambda w: quantized_of(w, 3, 32), "q3")
    assert 0.11 < linear3 < 0.13  # measured 0.1233 = 3.94 / 32


def test_sharded_save_loads(tmp_path):
    model = compress(build("llama"), mixed_plan())
    out = save(model, tmp_path / "out", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert checkpoint_bytes(out) == sum((out / s).stat().st_size for s in shards)
    assert torch.equal(logits(load_compressed(out)), logits(model))


def test_tokenizer_and_extra_files(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    extra = {"recipe.yaml": "method: svd\n", "report.json": b'{"ppl": 1.0}', "report.md": "# report\n"}
    out = save(compress(build("llama"), mixed_plan()), tmp_path / "out", tokenizer=tok, extra_files=extra)
    assert (out / "recipe.yaml").read_text() == "method: svd\n"
    assert (out / "report.json").read_bytes() == b'{"ppl": 1.0}'
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [1, 2]


def test_existing_dir_refused_then_overwritten(tmp_path):
    model = compress(build("llama"), mixed_plan())
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(UserError, match="output directory exists: .*--overwrite"):
        save(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "{}"

    save(model, out, overwrite=True, recipe_name="second")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["recipe"] == "second"
    assert torch.equal(logits(load_compressed(out)), logits(model))
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty and holds no model checkpoint"):
        save(compress(build("llama"), mixed_plan()), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "precious"


class _FailingTokenizer:
    def save_pretrained(self, path):  # runs after the weights and config are written
        raise RuntimeError("disk full")


def test_failure_midway_leaves_nothing(tmp_path):
    model = compress(build("llama"), mixed_plan())
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, tmp_path / "new" / "out", tokenizer=_FailingTokenizer())
    assert list((tmp_path / "new").iterdir()) == []

    # With --overwrite, a failed save keeps the previous checkpoint intact.
    out = save(model, tmp_path / "out", recipe_name="first")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, out, overwrite=True, tokenizer=_FailingTokenizer())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_modules_table_must_match_model(tmp_path):
    model = compress(build("llama"), mixed_plan())
    with pytest.raises(ValueError, match="does not match the model"):
        save(model, tmp_path / "out", modules={"model.layers.0.self_attn.q_proj": {"kind": "lowrank", "rank": 12}})
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_compressed(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        load_compressed(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_compressed(tmp_path / "empty")
    build("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(UserError, match="not an lrc checkpoint"):
        load_compressed(tmp_path / "dense")
    config_file = tmp_path / "dense" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": "lrc", "modules": {}, "from_the_future": 1}
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="unknown keys.*from_the_future"):
        load_compressed(tmp_path / "dense")

    # Strict: a config that lists a compressed module whose weights are dense in the file.
    config["quantization_config"] = hf_integration.LrcConfig(
        modules={"model.layers.0.self_attn.q_proj": {"kind": "lowrank", "rank": 8}}, method="svd", recipe="r"
    ).to_dict()
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match its config.*missing_keys.*q_proj.A.weight"):
        load_compressed(tmp_path / "dense")


def test_save_pretrained_of_loaded_model_roundtrips(tmp_path):
    model = compress(build("qwen2"), mixed_plan())
    out = save(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded.save_pretrained(tmp_path / "again")
    qc = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((out / "config.json").read_text())["quantization_config"]
    again = load_compressed(tmp_path / "again")
    assert specs(again) == specs(model)
    assert torch.equal(logits(again), logits(model))


def test_config_roundtrip_and_strictness():
    config = hf_integration.LrcConfig(
        modules={"a.b": {"kind": "quant", "bits": 4, "group_size": 128, "rank": 64}}, method="eora", recipe="r"
    )
    d = config.to_dict()
    assert hf_integration.LrcConfig.from_dict(d).to_dict() == d == dict(config)
    assert d["quant_method"] == "lrc" and d["lrc_version"]
    with pytest.raises(ValueError, match="unknown keys"):
        hf_integration.LrcConfig.from_dict({**d, "surprise": 1})
    with pytest.raises(ValueError, match="unknown kind"):
        hf_integration.LrcConfig(modules={"a": {"kind": "sparse"}})


def test_registration_is_idempotent(tmp_path):
    from transformers.quantizers import auto

    hf_integration.register()
    module = importlib.reload(hf_integration)  # a second import of the module must not raise
    module.register()
    assert auto.AUTO_QUANTIZER_MAPPING["lrc"] is module.LrcHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lrc"] is module.LrcConfig
    # No on-the-fly compression of a dense model: lrc needs calibration (`lrc compress`).
    build("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=module.LrcConfig())


def test_unknown_module_in_config_is_an_error(tmp_path):
    out = save(compress(build("llama"), mixed_plan()), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.7.mlp.up_proj"] = {"kind": "lowrank", "rank": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not have"):
        load_compressed(out)


def test_nn_linear_check(tmp_path):
    """A config naming a non-Linear module (here the embedding) is refused before loading."""
    out = save(compress(build("llama"), mixed_plan()), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["modules"]["model.embed_tokens"] = {"kind": "lowrank", "rank": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a Linear"):
        AutoModelForCausalLM.from_pretrained(out)
