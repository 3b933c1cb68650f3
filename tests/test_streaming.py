"""--low-memory: weights streamed from safetensors one decoder layer at a time must give exactly the checkpoint
the in-memory path writes, while never holding more than one decoder layer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor import api
from compressor.pipeline import streaming
from compressor.errors import UserError
from compressor.io.checkpoint import load_compressed
from compressor.recipe import load_recipe
from compressor.resources import demo_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(tmp_path: Path, model, name="dense", **save_kw) -> Path:
    folder = tmp_path / name
    model.save_pretrained(folder, **save_kw)
    for file in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer will do: calibration ids are given
        shutil.copy(demo_model_dir() / file, folder / file)
    return folder


def _tensors(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _in_memory(folder: Path, recipe, batches, out: Path):
    loaded = api.load_model(str(folder), keep_on_cpu=True)
    result = api.compress(loaded.model, recipe, batches=batches, storage_dtype=loaded.storage_dtype)
    result.save(out, tokenizer=loaded.tokenizer)
    return out


def assert_streams_like_in_memory(tmp_path: Path, model, recipe, batches):
    """--low-memory on `model`'s checkpoint writes the in-memory path's tensors exactly; returns its result."""
    folder = _checkpoint(tmp_path, model)
    expected = _tensors(_in_memory(folder, recipe, batches, tmp_path / "memory"))
    result, out = streaming.compress_streaming(str(folder), recipe, tmp_path / "streamed", batches=batches)
    streamed = _tensors(out)
    assert expected.keys() == streamed.keys()
    assert all(torch.equal(expected[k], streamed[k]) for k in expected)
    return result


@pytest.mark.parametrize("arch,tie,recipe_name,dtype", [
    ("llama", False, "svd-llm-20", torch.float32),
    ("qwen2", False, "eora-4bit", torch.float32),
    ("llama", True, "rtn-4bit", torch.bfloat16),
    ("mistral", False, "svd-20", torch.bfloat16),
    ("qwen2", True, "fwsvd-20", torch.float32),
    ("llama", False, "svd-llm-20 allocation=global allocation_options.weight=loss", torch.float32),
    ("qwen2", False, "svd-llm-40 allocation=energy allocation_options.energy=0.9", torch.bfloat16),
    ("llama", False, "fwsvd-20 allocation=global allocation_options.weight=relative", torch.float32),
    ("qwen2", False, "svd-llm-int8-40", torch.bfloat16),  # issue 14's encodings: 8-bit factors, bitmask sparse
    ("llama", False, "lowrank-sparse-50 iterations=2", torch.bfloat16),
    ("qwen2", False, "auto size_ratio=0.35 rank_step=4", torch.bfloat16),  # one loss-weighted byte budget
])
def test_streamed_output_equals_the_in_memory_output(tmp_path, tiny_model, calib_ids, arch, tie, recipe_name, dtype):
    """Rank allocation included: with --low-memory its planning pass reads each layer from disk."""
    model = tiny_model(arch, correlated=True, tie=tie).to(dtype)
    folder = _checkpoint(tmp_path, model, max_shard_size="100KB")  # a sharded input with an index
    assert (folder / streaming.INDEX_NAME).is_file()
    recipe_name, *overrides = recipe_name.split()
    recipe = load_recipe(recipe_name, ("calibration.nsamples=4", "calibration.seqlen=32", *overrides))
    batches = calib_ids(4, 32)
    expected = _in_memory(folder, recipe, batches, tmp_path / "memory")
    result, out = streaming.compress_streaming(str(folder), recipe, tmp_path / "streamed", batches=batches)

    assert len(result.modules) == 14 and sum(m.compressed for m in result.modules) >= 12
    a, b = _tensors(expected), _tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((expected / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    index = json.loads((out / streaming.INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) == 3  # 2 layers + rest
    ids = batches[:2]
    with torch.no_grad():
        assert torch.equal(load_compressed(expected)(ids).logits, load_compressed(out)(ids).logits)


@pytest.mark.parametrize("recipe_name,visits", [
    ("svd-llm-20", [0, 1, 2, 3, 4]),
    ("fwsvd-20", [0, 1, 2, 3, 4, 4, 3, 2, 1, 0] + [0, 1, 2, 3, 4]),  # Fisher pass forward, backward; then compress
    ("svd-llm-40 allocation=global allocation_options.weight=relative", [0, 1, 2, 3, 4] * 2),  # planning, compress
])
def test_at_most_one_decoder_layer_is_materialised(tmp_path, tiny_model, calib_ids, monkeypatch, recipe_name, visits):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_SIZES

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_SIZES, "num_hidden_layers": 5})).eval()
    folder = _checkpoint(tmp_path, model)
    seen = []
    def observing(original):
        def load(self, index, layer):
            original(self, index, layer)
            _, layers = streaming.find_decoder_layers(layer_model[0])
            seen.append([i for i, lay in enumerate(layers) if not any(p.is_meta for p in lay.parameters())])

        return load

    original_skeleton = streaming.load_skeleton
    layer_model = []

    def observing_skeleton(*args, **kwargs):
        out = original_skeleton(*args, **kwargs)
        layer_model.append(out.model)
        _, layers = streaming.find_decoder_layers(out.model)
        assert all(p.is_meta for p in layers.parameters())  # nothing of the layers read up front
        assert not any(p.is_meta for p in out.model.model.embed_tokens.parameters())
        # the untied head (0.9 GB fp32 at a 150k vocabulary) waits for a pass that runs the model (the Fisher pass)
        assert not out.model.config.tie_word_embeddings and out.model.lm_head.weight.is_meta
        return out

    # Every materialisation (the compression pass's `load`, the Fisher pass's `read`) goes through `read`.
    monkeypatch.setattr(streaming.LazyLayers, "read", observing(streaming.LazyLayers.read))
    monkeypatch.setattr(streaming, "load_skeleton", observing_skeleton)
    recipe_name, *overrides = recipe_name.split()
    streaming.compress_streaming(str(folder), recipe_name, tmp_path / "out", batches=calib_ids(2, 16),
                                 overrides=overrides)
    assert seen == [[i] for i in visits]


def test_the_fisher_pass_holds_the_head_in_the_checkpoint_dtype_and_never_with_the_embedding(
        tmp_path, tiny_model, calib_ids, monkeypatch):
    """An untied bf16 head at a 150k vocabulary is 0.47 GB, 0.93 GB at the fp32 compute dtype, and so is the
    embedding: during the Fisher pass the embedding waits on disk, the head is read (bf16) only for each chunk's
    head gradient and cast a vocabulary slice at a time (here 37 rows of 256: 7 slices), its logits taken 5
    positions at a time; the output still equals the in-memory path's exactly."""
    from compressor.pipeline import fisher

    monkeypatch.setattr(fisher, "HEAD_SLICE_ELEMENTS", 37 * 64)
    monkeypatch.setattr(fisher, "LOGIT_SLICE_ELEMENTS", 5 * 256)
    seen = []

    def observing(original, phase):
        def run(model, *args):
            head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
            seen.append((phase, embedding.weight.is_meta, head.weight.is_meta, head.weight.dtype))
            return original(model, *args)
        return run

    monkeypatch.setattr(fisher, "_head_gradient", observing(fisher._head_gradient, "head"))
    monkeypatch.setattr(fisher, "_fisher_of_chunk", observing(fisher._fisher_of_chunk, "layers"))
    model = tiny_model("llama", correlated=True, tie=False).to(torch.bfloat16)
    recipe = load_recipe("fwsvd-20", ("calibration.nsamples=4", "calibration.seqlen=32"))
    assert_streams_like_in_memory(tmp_path, model, recipe, calib_ids(4, 32))
    # the in-memory run's chunks come first (fp32 weights, all resident), then the streamed run's
    assert seen[-2][:3] == ("layers", True, True)  # neither embedding nor head in memory for the layers
    assert seen[-1] == ("head", True, False, torch.bfloat16)


def test_refusals_leave_nothing_on_disk(tmp_path, tiny_model, calib_ids):
    folder = _checkpoint(tmp_path, tiny_model("llama"))
    batches = calib_ids(2, 16)
    with pytest.raises(UserError, match="allocation 'global' needs a low-rank method"):
        streaming.compress_streaming(str(folder), "rtn-4bit", tmp_path / "b", batches=batches,
                                     overrides=("allocation=global",))
    bin_only = tmp_path / "bin"
    tiny_model("llama").save_pretrained(bin_only, safe_serialization=False) if _supports_bin() else bin_only.mkdir()
    shutil.copy(folder / "config.json", bin_only / "config.json")
    for f in bin_only.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(UserError, match="needs safetensors weights"):
        streaming.compress_streaming(str(bin_only), "svd-20", tmp_path / "c", batches=batches)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "dense"]


def _supports_bin() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def test_cli_low_memory_writes_a_report_and_refuses_eval(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "compressor.cli", "compress", str(demo_model_dir()), "-r", "rtn-4bit", "-o",
           str(out), "--low-memory", "--nsamples", "2", "--seqlen", "32", "--no-plots"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["low_memory"] is True and report["totals"]["compressed"] == 56
    assert {"load", "calibration_data", "statistics", "decomposition", "save"} <= set(report["timings_seconds"])
    cmd[cmd.index(str(out))] = str(tmp_path / "other")
    refused = subprocess.run(cmd + ["--eval"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--eval" in refused.stderr
    assert not (tmp_path / "other").exists()
