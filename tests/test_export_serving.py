"""`lrc export OUT --serving -o DST` of mixed `auto` outputs (compressor/io/export_serving.py) and auto's
`export: compressed-tensors` option (compressor/methods/auto.py).

The tiny fp32 Llama is compressed by `auto` restricted to the serving export (4-bit GPTQ or 4-bit GPTQ + EoRA,
under one byte budget), exported, and loaded by transformers + compressed-tensors (+ PEFT for the EoRA
residuals) in an interpreter where `import compressor` fails; its logits are compared with lrc's own (exact
reference path). Measured: equal bit for bit in one process (bound 1e-5 across processes). Low-rank modules of a mixed output are densified:
measured 1.2e-7.
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
TOLERANCE = 1e-5  # fp32
# size_ratio 0.3 of fp32 targets, 32-column groups, EoRA ranks in steps of 4: measured to pick 4-bit modules with
# and without EoRA residuals, so one export exercises the base and the adapter.
SERVING = ["size_ratio=0.3", "export=compressed-tensors", "group_size=32", "rank_step=4"]


def _compress(root: Path, tiny_model, calib_ids, recipe: str, overrides) -> Path:
    from compressor.api import compress
    from compressor.recipe import load_recipe

    out = root / "out"
    result = compress(tiny_model("llama", correlated=True), load_recipe(recipe, list(overrides)), batches=calib_ids())
    result.save(out, tokenizer=_tokenizer())
    return out


def _lrc_logits(out: Path) -> torch.Tensor:
    from compressor.io.checkpoint import load_compressed
    from compressor.nn.modules import prepare_inference

    model = load_compressed(out)
    prepare_inference(model, use_kernels=False)  # lrc's exact fp32 maths (the kernels round activations to bf16)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def _modules(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]["modules"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, calib_ids) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serving")
    out = _compress(root, tiny_model, calib_ids, "auto", SERVING)
    result = run("export", out, "--serving", "-o", root / "exported")
    assert result.exit_code == 0, result.output
    return out, root / "exported"


def test_auto_restricted_to_serving_picks_one_scheme_with_residuals_and_no_dense(served):
    out, exported = served
    modules = _modules(out)
    assert len(modules) == 14  # never dense: vLLM refuses q/k/v or gate/up with one part dense
    assert {(s["kind"], s["bits"], s["group_size"]) for s in modules.values()} == {("quant", 4, 32)}
    eora = sorted(name for name, s in modules.items() if s.get("rank"))
    assert 0 < len(eora) < len(modules)  # measured: some targets with a residual, some without

    qc = json.loads((exported / "base" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    assert (group["weights"]["num_bits"], group["weights"]["strategy"], group["weights"]["group_size"]) == \
        (4, "group", 32)
    adapter = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == eora and adapter["r"] == adapter["lora_alpha"]


LOAD_WITHOUT_LRC = """
import json, os, sys
# lrc is installed editable in this virtualenv: drop its finder, so `import compressor` fails as if it were absent
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
try:
    import compressor
    sys.exit("compressor is importable")
except ModuleNotFoundError:
    pass
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/base")
if os.path.isdir(sys.argv[1] + "/adapter"):
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, sys.argv[1] + "/adapter")
assert not any(name == "compressor" or name.startswith("compressor.") for name in sys.modules)
with torch.no_grad():
    torch.save(model(torch.tensor(json.loads(sys.argv[2]))).logits, sys.argv[3])
print(type(model).__name__, str(model.dtype))
"""


def load_without_lrc(exported: Path, logits_file: Path) -> torch.Tensor:
    """Logits of `exported` loaded by transformers (+ PEFT) in `python -I` with lrc made unimportable."""
    proc = subprocess.run([sys.executable, "-I", "-c", LOAD_WITHOUT_LRC, str(exported), json.dumps(IDS),
                           str(logits_file)], cwd=logits_file.parent, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "torch.float32", proc.stdout
    return torch.load(logits_file)


def test_transformers_and_peft_load_lrcs_logits(served):
    """In process (the real transformers + compressed-tensors + PEFT); the next test does it without lrc."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, exported = served
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(exported / "base"), exported / "adapter")
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
    # The same weights, the same GEMMs in the same layout (lrc's reference path keeps its factors row-major, as
    # PEFT's are): equal bit for bit in one process. Transposed EoRA factors gave 3e-8 here, 5.9e-5 on SmolLM2.
    assert torch.equal(logits, _lrc_logits(out)), (logits - _lrc_logits(out)).abs().max().item()


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~12 s on the shared 2-core machine
def test_loads_without_lrc_with_lrcs_logits(tmp_path, served):
    out, exported = served
    diff = (load_without_lrc(exported, tmp_path / "logits.pt") - _lrc_logits(out)).abs().max().item()
    print(f"max |transformers+peft (no lrc) - lrc| logits: {diff:.3g}")
    assert diff <= TOLERANCE, diff


def test_low_rank_modules_are_densified(tmp_path, tiny_model, calib_ids):
    """An unrestricted auto output with 8-bit low-rank factors beside 4-bit GPTQ: the factors are multiplied out
    into unquantized linears (in `ignore`), and the export says how many and how the bytes grow."""
    from transformers import AutoModelForCausalLM

    out = _compress(tmp_path, tiny_model, calib_ids, "auto",
                    ["size_ratio=0.2", "group_size=32", "candidates=[svd-llm-int8,gptq-4bit]"])
    low_rank = sorted(name for name, s in _modules(out).items() if s["kind"] == "lowrank_quant")
    assert low_rank  # measured: the o/v projections
    result = run("export", out, "--serving", "-o", tmp_path / "exported")
    assert result.exit_code == 0, result.output
    assert f"{len(low_rank)} low-rank modules made dense" in result.stdout and "grow from" in result.stdout
    qc = json.loads((tmp_path / "exported" / "base" / "config.json").read_text())["quantization_config"]
    assert set(low_rank) < set(qc["ignore"])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "exported" / "base")(torch.tensor(IDS)).logits
    assert (logits - _lrc_logits(out)).abs().max().item() <= TOLERANCE


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_refused_export_names_the_module_exits_2_and_writes_nothing(tmp_path, tiny_model, calib_ids):
    """group_size 48 leaves a ragged last group on 64-wide inputs, which compressed-tensors cannot hold. (A real
    subprocess's exit code for the same refusal path: tests/test_export_adapter.py::test_refuses_a_low_rank_output.)"""
    out = _compress(tmp_path, tiny_model, calib_ids, "rtn-4bit", ["group_size=48"])
    dst = tmp_path / "exported"
    one_error_line(run("export", out, "--serving", "-o", dst), "module model.layers.0.self_attn.q_proj: in_features "
                   "64 is not a multiple of group_size 48")
    assert not dst.exists() and hidden(tmp_path) == []


def test_two_schemes_and_low_rank_only_outputs_are_refused(tmp_path, tiny_model, calib_ids):
    """8-bit and 4-bit modules need two compressed-tensors schemes, which transformers 5.24 would load with the
    first one's (silently wrong weights, measured); both flags refuse them. A low-rank-only output has nothing to
    pack."""
    out = _compress(tmp_path / "mixed", tiny_model, calib_ids, "auto",
                    ["size_ratio=0.2", "group_size=32", "candidates=[gptq-8bit,gptq-4bit]"])
    assert {s["bits"] for s in _modules(out).values()} == {4, 8}  # 6.4 bits a weight: necessarily both
    for flag in ("--serving", "--quantized-adapter"):
        one_error_line(run("export", out, flag, "-o", tmp_path / "x"), "need two compressed-tensors schemes")
    svd = _compress(tmp_path / "svd", tiny_model, calib_ids, "svd-20", [])
    one_error_line(run("export", svd, "--serving", "-o", tmp_path / "x"), "use --dense")
    one_error_line(run("export", svd, "--serving", "--dense", "-o", tmp_path / "x"), "exactly one")
    assert not (tmp_path / "x").exists() and hidden(tmp_path) == []


def test_one_scale_per_row_joins_the_groups_scheme(tmp_path, tiny_model, calib_ids):
    """rtn 4-bit, 64-column groups: one scale per row on the 64-wide inputs, two groups on down_proj's 128 inputs.
    A 64-wide row is one 64-column group: one scheme, exact."""
    from transformers import AutoModelForCausalLM

    out = _compress(tmp_path, tiny_model, calib_ids, "rtn-4bit", ["group_size=64"])
    result = run("export", out, "--serving", "-o", tmp_path / "exported")
    assert result.exit_code == 0 and "4-bit, group 64" in result.stdout, result.output
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "exported" / "base")(torch.tensor(IDS)).logits
    assert (logits - _lrc_logits(out)).abs().max().item() <= TOLERANCE


def test_auto_export_option_refuses_what_the_export_cannot_hold(tiny_model, calib_ids):
    from compressor.api import compress
    from compressor.errors import UserError
    from compressor.recipe import load_recipe

    assert load_recipe("auto", ["export=compressed-tensors"]).method_options().candidates == \
        ("gptq-4bit", "gptq-4bit+eora")
    for candidates, words in (("[gptq-4bit,svd-llm]", "cannot hold svd-llm"), ("[gptq-3bit,gptq-4bit]", "one width")):
        with pytest.raises(UserError, match=words):
            load_recipe("auto", ["export=compressed-tensors", f"candidates={candidates}"])
    with pytest.raises(UserError, match=r"divisor of 64 \(e\.g\. 16\)"):
        compress(tiny_model("llama"), load_recipe("auto", ["export=compressed-tensors", "group_size=48"]),
                 batches=calib_ids())


def test_half_precision_export_loads_lrcs_weights_exactly(tmp_path, tiny_model, calib_ids):
    """A bf16 model: the scales are written in fp32 (lrc's fp16 values, exactly), so the loaded weights are lrc's
    bit for bit, in bf16 and when loaded in fp32. (Written in bf16, most fp16 scales were rounded: the demo
    model's export then differed from lrc by 0.029 in fp32 logits.)"""
    from compressor.api import compress
    from compressor.io.checkpoint import load_compressed
    from compressor.nn.modules import QuantLinear
    from compressor.recipe import load_recipe
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    compress(tiny_model("llama").to(torch.bfloat16), load_recipe("rtn-4bit", ["group_size=32"]),
             batches=calib_ids()).save(out)
    assert run("export", out, "--serving", "-o", tmp_path / "exported").exit_code == 0
    for dtype in (torch.bfloat16, torch.float32):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "exported" / "base", dtype=dtype)
        lrc = [(n, m) for n, m in load_compressed(out, dtype=dtype).named_modules() if isinstance(m, QuantLinear)]
        assert len(lrc) == 14 and base.dtype == dtype
        for name, module in lrc:
            assert torch.equal(base.get_submodule(name).weight, module.dequantized_weight().to(dtype)), (name, dtype)


def test_serving_budget_counts_the_exports_fp32_scales():
    from compressor.methods.auto import AutoOptions, _Target

    w = torch.zeros(96, 256)
    plain, served = (_Target(w, None, AutoOptions(**extra)).bytes("gptq-4bit", 0)
                     for extra in ({}, {"export": "compressed-tensors"}))
    assert served - plain == 2 * 96 * 2  # two 128-column groups a row, 2 bytes more per scale
