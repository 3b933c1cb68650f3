"""An lrc checkpoint loaded by plain transformers, without `import compressor`, must fail loudly, never return a
model with random weights where the compressed linears were (transformers only warns about an unknown
`quant_method`). A real subprocess: the test process itself has compressor imported and registered."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.nn import hf_integration
from compressor.io.checkpoint import load_compressed
from tests.test_io import INPUT, build, compress, logits, mixed_plan, save

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    inputs, jobs = torch.load(sys.argv[1]), json.loads(sys.argv[2])  # jobs: {arch: [checkpoint, reference logits]}
    result = {}
    for arch, (out, ref) in jobs.items():
        try:
            model = AutoModelForCausalLM.from_pretrained(out)
        except Exception as exc:  # the only acceptable alternative is identical logits
            result[arch] = {"without": {"raised": type(exc).__name__, "message": str(exc)}}
        else:
            with torch.no_grad():
                same = torch.equal(model(inputs).logits, torch.load(ref))
            result[arch] = {"without": {"raised": None, "same_logits": same}}
    assert "compressor" not in sys.modules
    import compressor  # noqa: F401
    for arch, (out, ref) in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            same = torch.equal(model(inputs).logits, torch.load(ref))
        result[arch]["with"] = {"same_logits": same, "class": type(model).__name__}
    print(json.dumps(result))
""")

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("without-lrc")
    made = {}
    for arch in ("llama", "qwen2"):
        model = compress(build(arch), mixed_plan())
        out = save(model, folder / arch)
        torch.save(logits(model), folder / f"{arch}.pt")
        made[arch] = out
    # A loaded lrc model saved again with save_pretrained (a fine-tune, a Trainer checkpoint): its config is
    # transformers' (LlamaConfig), yet the copy must be just as unloadable without lrc.
    AutoModelForCausalLM.from_pretrained(made["llama"]).save_pretrained(folder / "resaved")
    torch.save(torch.load(folder / "llama.pt"), folder / "resaved.pt")
    made["resaved"] = folder / "resaved"
    torch.save(INPUT, folder / "input.pt")
    return folder, made


def test_plain_transformers_refuses_and_lrc_loads_identically(checkpoints):
    folder, made = checkpoints
    jobs = {arch: [str(out), str(folder / f"{arch}.pt")] for arch, out in made.items()}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder / "input.pt"), json.dumps(jobs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Unknown quantization type" not in proc.stderr  # refused up front, not "skipped" with a warning
    for arch, result in results.items():
        without = result["without"]
        assert without["raised"] or without["same_logits"], result  # never silently different
        assert without["raised"] == "ValueError", result
        assert "import compressor" in without["message"] and "install lrc" in without["message"], without
        assert result["with"] == {"same_logits": True, "class": f"{'Qwen2' if arch == 'qwen2' else 'Llama'}ForCausalLM"}


def test_config_records_the_base_architecture(checkpoints):
    _, made = checkpoints
    config = json.loads((made["qwen2"] / "config.json").read_text())
    assert config["model_type"] == hf_integration.MODEL_TYPE
    assert config["quantization_config"]["base_model_type"] == "qwen2"
    assert hf_integration.LrcConfig.from_dict(config["quantization_config"]).to_dict() == config["quantization_config"]


def test_checkpoints_from_before_the_model_type_still_load(checkpoints, tmp_path):
    """Written by an earlier lrc: model_type is the architecture's, no base_model_type. lrc still loads them."""
    import shutil

    _, made = checkpoints
    old = tmp_path / "old"
    shutil.copytree(made["llama"], old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = config["quantization_config"].pop("base_model_type")
    (old / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(load_compressed(old)), logits(load_compressed(made["llama"])))


def test_push_to_hub_from_save_pretrained_is_refused(checkpoints, tmp_path):
    _, made = checkpoints
    model = AutoModelForCausalLM.from_pretrained(made["llama"])
    with pytest.raises(ValueError, match="upload the folder"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    assert not (tmp_path / "x").exists()


def test_a_broken_lrc_config_is_a_clear_error(checkpoints, tmp_path):
    import shutil

    from transformers import AutoConfig

    _, made = checkpoints
    broken = tmp_path / "broken"
    shutil.copytree(made["llama"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["base_model_type"] = "no-such-architecture"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="base_model_type.*no-such-architecture"):
        AutoConfig.from_pretrained(broken)
