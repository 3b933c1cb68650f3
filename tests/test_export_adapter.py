"""`lrc export OUT --quantized-adapter -o DST`: a compressed-tensors base plus a PEFT LoRA adapter (export_adapter.py).

The base loads with plain `AutoModelForCausalLM.from_pretrained(DST/base)` and the EoRA residuals with
`PeftModel.from_pretrained(base, DST/adapter)`, in a fresh interpreter that never imports `compressor`; logits are
compared with lrc's own loader. Measured on the tiny fp32 Llama below: max |Δlogit| = 0.0 — the dequantized
weights are bit-identical and PEFT adds lora_B(lora_A x)·1.0 after the base linear exactly as QuantLinear does.
The bound asserted is 1e-5. (bf16/fp16 checkpoints, measured by hand on the same model: 0.0 with
`autocast_adapter_dtype=False`; with PEFT's default the adapter runs in fp32, ≈ one half-precision ulp of the
logits: 3.9e-3 bf16, 4.9e-4 fp16 for logits of magnitude ~0.6.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import one_error_line, run
from tests.helpers import word_tokenizer as _tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
IDS = [[1, 5, 9, 200, 17, 3, 250, 42, 7, 8, 99, 100], [0, 255, 128, 64, 32, 16, 8, 4, 2, 1, 77, 66]]
TOLERANCE = 1e-5  # fp32; measured 0.0


def _lrc_output(root: Path, tiny_model, calib_ids, recipe: str, overrides=()) -> Path:
    from compressor.api import compress
    from compressor.recipe import load_recipe

    out = root / recipe
    result = compress(tiny_model("llama"), load_recipe(recipe, list(overrides)), batches=calib_ids())
    result.save(out, tokenizer=_tokenizer())
    return out


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def eora(tmp_path_factory, tiny_model, calib_ids) -> tuple[Path, Path]:
    """(lrc output, its export). EoRA rank 40 on 64-wide inputs: k/v_proj (32 outputs) get rank 32, so the adapter
    needs a rank_pattern; group_size 32 gives two groups per row of the 64-wide inputs."""
    root = tmp_path_factory.mktemp("eora")
    out = _lrc_output(root, tiny_model, calib_ids, "eora-4bit", ["rank=40", "group_size=32"])
    result = run("export", out, "--quantized-adapter", "-o", root / "exported")
    assert result.exit_code == 0, result.output
    assert "14 quantized modules" in result.stdout and "14 EoRA residuals" in result.stdout, result.stdout
    return out, root / "exported"


def _lrc_logits(out: Path, *, without_residual: bool = False) -> torch.Tensor:
    from compressor.io.checkpoint import load_compressed
    from compressor.nn.modules import QuantLinear, prepare_inference

    model = load_compressed(out)
    prepare_inference(model, use_kernels=False)  # lrc's exact fp32 maths (the kernels round activations to bf16)
    if without_residual:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, QuantLinear) and m.rank:
                    m.lora_B.weight.zero_()  # y + lora_B(lora_A x) adds exactly +0.0
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def _plain_base(exported: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(exported / "base")


def test_layout_and_configs(eora):
    from safetensors import safe_open

    out, exported = eora
    assert sorted(p.name for p in exported.iterdir()) == ["adapter", "base"]
    assert hidden(exported.parent) == []  # no temporary directory left
    assert (exported / "base" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    qc = json.loads((exported / "base" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["dequantize"] is True
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    weights = group["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == \
        (4, "group", 32, False)
    with safe_open(exported / "base" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefix = "model.layers.0.self_attn.q_proj."
    assert {k for k in keys if k.startswith(prefix)} == \
        {prefix + s for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
    assert "lm_head.weight" in keys and not any("qweight" in k or "lora" in k for k in keys)

    adapter = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == adapter["lora_alpha"] == 40  # scaling exactly 1
    assert adapter["lora_dropout"] == 0.0 and not adapter["use_rslora"] and not adapter["use_dora"]
    assert len(adapter["target_modules"]) == 14 and "model.layers.1.mlp.down_proj" in adapter["target_modules"]
    assert adapter["rank_pattern"] == adapter["alpha_pattern"] == {
        rf"model\.layers\.{i}\.self_attn\.{p}": 32 for i in (0, 1) for p in ("k_proj", "v_proj")}
    assert adapter["base_model_name_or_path"] == str((exported / "base").resolve())
    with safe_open(exported / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight").shape == (32, 64)
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight").shape == (32, 32)
        assert len(list(f.keys())) == 28


def test_base_and_adapter_match_lrc(eora):
    """In process: the base's weights are lrc's dequantized weights bit for bit; base alone = lrc without its
    residuals; base + adapter = lrc."""
    from peft import PeftModel

    from compressor.io.checkpoint import load_compressed
    from compressor.nn.modules import QuantLinear

    out, exported = eora
    base = _plain_base(exported)
    lrc = load_compressed(out)
    quantized = [(name, m) for name, m in lrc.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14
    for name, module in quantized:
        assert torch.equal(base.get_submodule(name).weight, module.dequantized_weight()), name
    with torch.no_grad():
        base_logits = base(torch.tensor(IDS)).logits
    assert (base_logits - _lrc_logits(out, without_residual=True)).abs().max().item() <= TOLERANCE

    model = PeftModel.from_pretrained(base, exported / "adapter")
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
    diff = (logits - _lrc_logits(out)).abs().max().item()
    print(f"max |peft - lrc| logits: {diff:.3g}")
    assert diff <= TOLERANCE, diff
    assert (logits - base_logits).abs().max().item() > 1e-3  # the adapter really does something


LOAD_WITHOUT_LRC = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/base")
tok = AutoTokenizer.from_pretrained(sys.argv[1] + "/base")
model = PeftModel.from_pretrained(base, sys.argv[1] + "/adapter")
assert not any(name == "compressor" or name.startswith("compressor.") for name in sys.modules)
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
torch.save(logits, sys.argv[3])
print(type(base).__name__, type(model).__name__, str(base.dtype), type(tok).__name__)
"""


def test_loads_without_lrc_in_a_fresh_interpreter(tmp_path, eora):
    out, exported = eora
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LRC, str(exported), json.dumps(IDS),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:3] == ["LlamaForCausalLM", "PeftModelForCausalLM", "torch.float32"], proc.stdout
    diff = (torch.load(tmp_path / "logits.pt") - _lrc_logits(out)).abs().max().item()
    print(f"max |peft (no lrc) - lrc| logits: {diff:.3g}")
    assert diff <= TOLERANCE, diff


def test_without_residual_exports_the_base_only(tmp_path, tiny_model, calib_ids):
    """rtn, symmetric, one group per row (group_size 128 ≥ in_features): per-channel, no zero points stored."""
    from safetensors import safe_open

    out = _lrc_output(tmp_path, tiny_model, calib_ids, "rtn-4bit", ["symmetric=true"])
    result = run("export", out, "--quantized-adapter", "-o", tmp_path / "exported")
    assert result.exit_code == 0, result.output
    assert "no EoRA residual" in result.stdout and "no adapter" in result.stdout, result.stdout
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["base"]
    qc = json.loads((tmp_path / "exported" / "base" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert (group["weights"]["strategy"], group["weights"]["symmetric"]) == ("channel", True)
    with safe_open(tmp_path / "exported" / "base" / "model.safetensors", "pt") as f:
        assert not any(k.endswith("weight_zero_point") for k in f.keys())
    with torch.no_grad():
        logits = _plain_base(tmp_path / "exported")(torch.tensor(IDS)).logits
    assert (logits - _lrc_logits(out)).abs().max().item() <= TOLERANCE


def test_refuses_a_low_rank_output(tmp_path, tiny_model, calib_ids):
    """A real subprocess: exit code 2, one `error:` line, nothing on disk."""
    out = _lrc_output(tmp_path, tiny_model, calib_ids, "svd-20")
    dst = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", "export", str(out), "--quantized-adapter",
                           "-o", str(dst)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "needs a quantized lrc output" in proc.stderr and "--dense" in proc.stderr, proc.stderr
    assert not dst.exists() and hidden(tmp_path) == []


def test_cli_errors(tmp_path, eora):
    out, exported = eora
    one_error_line(run("export", out, "-o", tmp_path / "d1"), "pass --dense")
    one_error_line(run("export", out, "--dense", "--quantized-adapter", "-o", tmp_path / "d2"), "exactly one")
    one_error_line(run("export", out, "--quantized-adapter", "-o", exported), "output directory exists")
    one_error_line(run("export", tmp_path / "absent", "--quantized-adapter", "-o", tmp_path / "d3"), "not a directory")
    one_error_line(run("export", out, "--quantized-adapter", "-o", out, "--overwrite"), "source checkpoint itself")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing(tmp_path, eora, monkeypatch):
    """An error half way (after the base is written) leaves no directory; over an old export, the old one stays."""
    from compressor.io import export_adapter

    out, exported = eora

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_adapter, "_write_adapter", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_adapter.export_quantized_with_adapter(out, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    import shutil

    shutil.copytree(exported, tmp_path / "old")
    before = sorted(str(p.relative_to(tmp_path / "old")) for p in (tmp_path / "old").rglob("*"))
    with pytest.raises(RuntimeError, match="disk full"):
        export_adapter.export_quantized_with_adapter(out, tmp_path / "old", overwrite=True)
    assert sorted(str(p.relative_to(tmp_path / "old")) for p in (tmp_path / "old").rglob("*")) == before
    assert hidden(tmp_path) == []
    monkeypatch.undo()
    export_adapter.export_quantized_with_adapter(out, tmp_path / "old", overwrite=True)  # a real overwrite works
    assert (tmp_path / "old" / "adapter" / "adapter_config.json").is_file() and hidden(tmp_path) == []


def test_ragged_groups_and_missing_packages_are_user_errors(monkeypatch, eora):
    from compressor.errors import UserError
    from compressor.io.export_adapter import _weight_args, export_quantized_with_adapter
    from compressor.nn.modules import QuantLinear

    ragged = QuantLinear(64, 8, bits=4, group_size=48, bias=False)  # two groups, the second one 16 wide
    with pytest.raises(UserError, match="not a multiple of group_size 48"):
        _weight_args(ragged, "m")
    out, exported = eora
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'lrc\[export\]'"):
        export_quantized_with_adapter(out, exported.parent / "never")
    assert not (exported.parent / "never").exists()
