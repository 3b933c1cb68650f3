"""`lrc export --quantized-adapter` against what vLLM checks when it serves a LoRA adapter on a compressed-tensors
base. vLLM itself is not installed here (CUDA-only wheels, no GPU on the development machine), so these tests check
the exported files against vLLM's loading code as read from its source (vllm/lora/peft_helper.py, vllm/config/lora.py,
compressed_tensors_wNa16.py and marlin_utils.py), not a vLLM run:

- adapter_config.json goes through `PEFTHelper.from_dict`: required `r`, `lora_alpha`, `target_modules`; unknown
  keys are dropped, so PEFT's `rank_pattern` / `alpha_pattern` are ignored and every module is scaled by
  lora_alpha / r — it must be PEFT's per-module scaling for every module (lrc writes r = lora_alpha: 1); `bias`
  "none", no `modules_to_save`, no DoRA.
- `--max-lora-rank` takes one of VLLM_MAX_LORA_RANKS and must be ≥ every module's rank (the adapter tensors keep
  their own ranks; vLLM pads them).
- Tensor names `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (parse_fine_tuned_lora_name).
- The base: quant_method compressed-tensors, format pack-quantized, weights-only int 4/8-bit (CompressedTensorsWNA16:
  WNA16_SUPPORTED_BITS), strategy group or channel; asymmetric modules (zero points) need a vLLM with
  WNA16_ZP_SUPPORTED_TYPES_MAP; Marlin needs out % 64 == 0, in % 128 == 0 per partition and group_size in
  {-1, 32, 64, 128} — tiny test models do not meet the shape rule, which `vllm_shape_problems` reports instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)


def vllm_max_lora_rank(adapter: Path) -> int:
    """The smallest `--max-lora-rank` vLLM accepts for this adapter."""
    from safetensors.torch import load_file

    ranks = [t.shape[0] for k, t in load_file(adapter / "adapter_model.safetensors").items() if ".lora_A." in k]
    return next(r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks))


def vllm_shape_problems(base: Path) -> list[str]:
    """Modules vLLM's Marlin WNA16 kernels would refuse (tensor-parallel size 1)."""
    from safetensors.torch import load_file

    problems = []
    for file in base.glob("*.safetensors"):
        for key, shape in ((k, t.tolist()) for k, t in load_file(file).items() if k.endswith(".weight_shape")):
            out, inp = shape
            if out % 64 or inp % 128:
                problems.append(f"{key.removesuffix('.weight_shape')}: {out}×{inp}")
    return problems


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, calib_ids) -> Path:
    from compressor.api import compress
    from compressor.io.export_adapter import export_quantized_with_adapter
    from compressor.recipe import load_recipe

    root = tmp_path_factory.mktemp("vllm")
    result = compress(tiny_model("llama"), load_recipe("eora-4bit", ["rank=40", "group_size=32"]), batches=calib_ids())
    export_quantized_with_adapter(result.save(root / "out"), root / "exported")
    return root / "exported"


def test_adapter_config_meets_vllm_peft_helper(exported):
    config = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= set(config)
    assert config.get("bias", "none") == "none" and not config.get("modules_to_save") and not config.get("use_dora")
    assert not config.get("use_rslora")
    vllm_scaling = config["lora_alpha"] / config["r"]  # what vLLM applies to every module
    for module in config["target_modules"]:
        peft_scaling = (config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
                        / config.get("rank_pattern", {}).get(module, config["r"]))
        assert peft_scaling == vllm_scaling == 1.0, module
    assert config.get("rank_pattern")  # k/v_proj have rank 32 < 40: vLLM loads them at their own rank, scaled by 1


def test_adapter_tensors_and_max_lora_rank(exported):
    from safetensors.torch import load_file

    tensors = load_file(exported / "adapter" / "adapter_model.safetensors")
    assert tensors and all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight",
                                                                                        ".lora_B.weight"))
                           for k in tensors)
    assert vllm_max_lora_rank(exported / "adapter") == 64  # ranks 40 and 32: vllm serve --max-lora-rank 64


def test_base_quantization_config_is_a_vllm_wna16_scheme(exported):
    qc = json.loads((exported / "base" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    for group in qc["config_groups"].values():
        weights = group["weights"]
        assert group.get("input_activations") is None  # weights-only: W4A16 / W8A16
        assert weights["type"] == "int" and weights["num_bits"] in (4, 8)
        assert weights["strategy"] in ("group", "channel")
        assert weights["strategy"] == "channel" or weights["group_size"] in MARLIN_GROUP_SIZES
        assert weights["symmetric"] is False  # lrc's rtn/eora default: needs vLLM's zero-point WNA16 path
    # The tiny model's 64-wide layers are below Marlin's 128-column tile: reported, as docs/benchmarks.md says.
    assert vllm_shape_problems(exported / "base")
