"""Export a quantized lrc output (rtn / gptq / eora recipes) as a standard quantized base plus a PEFT LoRA adapter.

    from compressor.io.export_adapter import export_quantized_with_adapter
    export_quantized_with_adapter("out/", "exported/")        # or: lrc export out/ --quantized-adapter -o exported/

    base = AutoModelForCausalLM.from_pretrained("exported/base")        # needs `compressed-tensors`, not lrc
    model = PeftModel.from_pretrained(base, "exported/adapter")         # needs `peft`; = lrc's model

Layout of the destination:
  base/      a compressed-tensors checkpoint, format `pack-quantized`, written by the `compressed-tensors` library
             (the format llm-compressor writes and transformers' CompressedTensorsHfQuantizer reads). Every
             QuantLinear becomes an nn.Linear stored as `weight_packed` (int32, b-bit codes packed densely along the
             input dimension), `weight_scale` (out, groups) in fp32, `weight_shape`, and, for asymmetric
             modules, `weight_zero_point` (packed along the output dimension); its bias stays as is. config.json's
             `quantization_config` (quant_method "compressed-tensors") holds one config group, the (bits,
             strategy, group_size, symmetric) every module shares (compressor/io/export_serving.py refuses an
             output that needs two: transformers cannot load them), `targets: ["Linear"]`, with every other
             nn.Linear (e.g. a dense lm_head) in `ignore`; plus `dequantize: true`
             (see `_dequantize_on_load`: transformers unpacks the weights to the model dtype at load time — the
             file is b-bit, the loaded model is dense). Everything else (embeddings, norms, modules lrc left dense)
             is copied dense. Tokenizer files are copied here.
  adapter/   the EoRA residuals as a PEFT LoRA adapter: adapter_config.json (peft_type LORA, target_modules = the
             full names of the modules with a residual, r = lora_alpha so the scaling alpha/r is exactly 1,
             rank_pattern/alpha_pattern for modules whose rank differs, lora_dropout 0, base_model_name_or_path =
             the absolute path of base/) and adapter_model.safetensors (`base_model.model.<name>.lora_A.weight`
             (r, in) and `.lora_B.weight` (out, r), in the checkpoint dtype). Absent when no module has a residual
             (rtn / gptq outputs): the base alone is then the whole model.

Convention mapping (read from compressed_tensors.quantization.lifecycle.forward and pack_quantized/helpers.py):
lrc stores unsigned codes q and zero points z in [0, 2^b − 1] with w = (q − z)·s; compressed-tensors quantizes to
signed codes q' in [−2^(b−1), 2^(b−1) − 1] with w = (q' − z')·s (its packer adds 2^(b−1) back). So
z' = z − 2^(b−1), q' = q − 2^(b−1) and q' − z' = q − z: the same weights. The library computes q' itself, by
quantizing the dequantized fp32 weight (q − z)·s with the same s and z' — exact, since (q − z)·s with
|q − z| < 2^8 and an fp16 s is exactly representable in fp32. A module whose zeros all equal 2^(b−1) (lrc's
symmetric) becomes symmetric (z' = 0, no zero point stored). A module with one group per row (group_size ≥
in_features) becomes per-channel; otherwise the group size must divide in_features (compressed-tensors has no
ragged last group): refused if not.

Exactness (tests/test_export_adapter.py, tests/test_export_serving.py): the loaded base's weights equal lrc's
`dequantized_weight()` cast to the model dtype (what QuantLinear.forward uses) bit for bit, in fp32, bf16 and
fp16. compressed-tensors dequantises in the scale's dtype: the scales are written in fp32 (lrc's fp16 values,
exactly), where (q − z)·s is exact, so the weight is rounded to the model dtype once, as lrc rounds it. (Written
in bf16, an fp16 scale is rounded, ≤ 2^-9 relative; in fp16, the product is. The demo model's 3-bit export
differed from lrc by 0.029 in fp32 logits that way.) That costs 2 bytes a group more than lrc's fp16 scales.
PEFT adds lora_B(lora_A x)·1.0 after the base linear, as QuantLinear.forward does: fp32 logits are identical
(max |Δ| = 0.0). On a half-precision model PEFT's default `autocast_adapter_dtype=True` runs the adapter in fp32,
which moves the logits by about one half-precision ulp (3.9e-3 bf16, 4.9e-4 fp16 on logits of ~0.6); with
`PeftModel.from_pretrained(..., autocast_adapter_dtype=False)` they are identical again.

The write is atomic, like compressor.export: a hidden temporary directory next to the destination, renamed into
place when complete, removed on any error.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from compressor import quant
from compressor.errors import UserError
from compressor.io.checkpoint import CONFIG_NAME, check_destination, read_quantization_config
from compressor.nn.modules import QuantLinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _refuse_unless_quantized(src: Path) -> None:
    qc = read_quantization_config(src)  # UserError when src is not an lrc checkpoint
    kinds = sorted({spec.get("kind") for spec in qc["modules"].values()})
    if not qc["modules"] or kinds != ["quant"]:
        raise UserError(f"--quantized-adapter needs a quantized lrc output (rtn, gptq or eora recipes); {src} was "
                        f"made with method {qc.get('method')!r} ({', '.join(map(str, kinds)) or 'no'} modules): "
                        "use --dense")


def _check_export_destination(dst: Path, overwrite: bool) -> None:
    """Like io.check_destination, but a previous export (base/config.json inside) may be overwritten too."""
    if overwrite and dst.is_dir() and not dst.is_symlink() and (dst / "base" / CONFIG_NAME).is_file():
        return
    check_destination(dst, overwrite)


def _weight_args(module: QuantLinear, name: str) -> tuple[dict, torch.Tensor]:
    """compressed-tensors QuantizationArgs (as a dict) and the signed int8 zero points (out, groups)."""
    groups = module.scales.shape[1]
    offset = 2 ** (module.bits - 1)
    zero = quant.unpack(module.qzeros, module.bits, groups) - offset  # lrc unsigned -> compressed-tensors signed
    args = {"num_bits": module.bits, "type": "int", "symmetric": bool((zero == 0).all())}
    if groups == 1:
        args["strategy"] = "channel"
    elif module.in_features % module.group_size == 0:
        args.update(strategy="group", group_size=module.group_size)
    else:
        raise UserError(f"module {name}: in_features {module.in_features} is not a multiple of group_size "
                        f"{module.group_size}; compressed-tensors has no ragged last group (use --dense)")
    return args, zero.to(torch.int8)


@torch.no_grad()
def _pack_module(module: QuantLinear, args: dict, zero: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear holding `module`'s codes packed by compressed-tensors (`weight_packed`, `weight_scale`, ...)."""
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle import initialize_module_for_quantization

    device = module.scales.device
    # fp32 while compressing: (q − z)·s is exact there, so the library's quantize() recovers exactly q.
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=torch.float32,
                       device=device)
    linear.weight.copy_(module.dequantized_weight())
    if module.bias is not None:
        linear.bias.copy_(module.bias.float())
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args), format="pack-quantized")
    initialize_module_for_quantization(linear, scheme)
    linear.weight_scale.copy_(module.scales.float())
    linear.weight_zero_point.copy_(zero)
    compress_module(linear, "pack-quantized")
    scale = linear.weight_scale.data  # lrc's fp16 scales, exactly
    linear = linear.to(dtype)  # the bias to the model dtype; the int tensors are untouched
    # The scales stay fp32: compressed-tensors dequantises in the scale's dtype, where (q − z)·s is exact, so the
    # loaded weight is lrc's rounded once to the model dtype. (In bf16 the scale itself would be rounded; in fp16
    # the product.) 2 more bytes per group than lrc's fp16 scales on a half-precision model.
    linear.weight_scale.data = scale
    return linear


def _config_groups(schemes: dict[str, dict], linears: list[str]):
    """compressed-tensors QuantizationConfig: the one weight scheme of every quantized module (export_serving's
    _one_scheme made them equal), targeting "Linear", every other nn.Linear in `ignore` (vLLM refuses a linear that
    is neither targeted nor ignored)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    (args,) = {tuple(sorted(a.items())) for a in schemes.values()}
    groups = {"group_0": {"targets": ["Linear"], "weights": dict(args), "format": "pack-quantized"}}
    ignore = [name for name in linears if name not in schemes]
    return QuantizationConfig(config_groups=groups, format="pack-quantized", ignore=ignore,
                              quantization_status=QuantizationStatus.COMPRESSED)


def _dequantize_on_load(config_file: Path) -> None:
    """Set `dequantize: true` in the compressed-tensors config: transformers then unpacks the weights at load time
    (CompressedTensorsConfig's documented loading option, read from config.json by its from_dict). Without it the
    quantized linears stay weight-less (`weight_packed` ...) until their first forward, and PEFT cannot wrap an
    nn.Linear that has no `weight`; and transformers 5.23 with compressed-tensors 0.20.0 cannot load asymmetric
    pack-quantized modules that way at all (the library's meta-device compress does not pack the zero points, so
    their shape mismatches the checkpoint's)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["quantization_config"]["dequantize"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _adapter_config(ranks: dict[str, int], base_path: Path):
    from peft import LoraConfig

    r = Counter(ranks.values()).most_common(1)[0][0]
    # Pattern keys are regexes matched against the end of a module name: escape the dots of the full name.
    pattern = {name.replace(".", r"\."): rank for name, rank in sorted(ranks.items()) if rank != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=pattern,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", inference_mode=True,
                      base_model_name_or_path=str(base_path))


def _write_adapter(folder: Path, lora: dict[str, torch.Tensor], ranks: dict[str, int], base_path: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    _adapter_config(ranks, base_path).save_pretrained(folder)
    save_file(lora, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def export_quantized_with_adapter(src, dst, *, overwrite: bool = False,
                                  max_shard_size: int | str = "2GB") -> ServingExport:  # (export_serving.py)
    """Write `dst/base/` (compressed-tensors, pack-quantized) and `dst/adapter/` (PEFT LoRA: the EoRA residuals)
    from the quantized lrc output `src`. UserError for a non-quantized output or an unusable destination.
    compressor/io/export_serving.py's export, restricted to outputs whose every module is quantised."""
    from compressor.io.export_serving import export_serving  # it builds on this module's helpers

    return export_serving(src, dst, overwrite=overwrite, max_shard_size=max_shard_size, quantized_only=True)
