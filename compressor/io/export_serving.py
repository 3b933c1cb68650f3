"""Export any lrc output whose encodings a serving format holds: a compressed-tensors base plus a PEFT LoRA adapter.

    from compressor.io.export_serving import export_serving
    export_serving("out/", "exported/")        # or: lrc export out/ --serving -o exported/

The layout, the packing and the convention mapping are `--quantized-adapter`'s (compressor/io/export_adapter.py's
docstring); this export takes mixed outputs too, like `--target-size` (recipe `auto`) writes:
- QuantLinear (GPTQ / RTN at 1–8 bits, compressed-tensors packs them all) → `weight_packed` in the base, under the
  config's one group: every quantized module must share its (bits, strategy, group_size) (`_one_scheme` says why;
  `auto` with `export: compressed-tensors` makes outputs that do);
- its EoRA residual, if any → the PEFT adapter (r = lora_alpha, scaling 1);
- nn.Linear that lrc left dense (and lm_head) → dense in the base, listed in the config's `ignore` (vLLM refuses a
  linear that no group targets and `ignore` does not name);
- low-rank modules (LowRankLinear, QuantLowRankLinear, LowRankSparseLinear) → an unquantised nn.Linear in the base,
  listed in `ignore`. No serving format holds the factors, and a LoRA on a base needs a base weight as large as the
  dense one; the dense weight is the same `dense_weight()` `--dense` writes (the stored factors — dequantised
  exactly for 4/8-bit factors, plus the sparse part — multiplied in fp64, rounded once to the model dtype), so it is
  as exact as that export: equal to lrc's y = B(A x) up to float rounding order. It grows the checkpoint: the
  result says by how much, and `auto` with `export: compressed-tensors` never picks these encodings.
Refused, in one line naming the module, before anything is written: a quantised module with a ragged last group
(compressed-tensors has none), two quantised modules with different schemes, an lrc module of a kind this export
does not know, an output with no quantised module (nothing to pack: use --dense).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compressor.errors import UserError
from compressor.io import export_adapter as ea
from compressor.io.checkpoint import CONFIG_NAME, atomic_output_dir, load_compressed, read_quantization_config
from compressor.io.export import copy_tokenizer_files, dense_linear, detach_lrc_quantizer, replace_module
from compressor.nn.modules import LowRankLinear, LowRankSparseLinear, QuantLinear, QuantLowRankLinear, stored_bytes

DENSIFIED = (LowRankLinear, QuantLowRankLinear, LowRankSparseLinear)


@dataclass
class ServingExport:
    """What `export_serving` wrote."""

    path: Path
    base: Path
    adapter: Path | None  # None: no module had an EoRA residual, the base is the whole model
    quantized: int  # QuantLinear modules written packed
    scheme: str  # their one compressed-tensors scheme, e.g. "4-bit, group 128"
    residuals: int  # of which with a LoRA residual in the adapter
    densified: int  # low-rank modules written as unquantised nn.Linear
    densified_bytes: tuple[int, int]  # those modules' weights: (lrc's stored bytes, the dense bytes written)


def _refuse_unservable(src: Path, *, quantized_only: bool) -> None:
    qc = read_quantization_config(src)  # UserError when src is not an lrc checkpoint
    kinds = {spec.get("kind") for spec in qc["modules"].values()}
    if quantized_only:
        ea._refuse_unless_quantized(src)
    elif "quant" not in kinds:
        raise UserError(f"--serving needs an lrc output with quantized modules; {src} (method {qc.get('method')!r}) "
                        "has none, so a serving format would hold it dense: use --dense")
    unknown = sorted(name for name, spec in qc["modules"].items() if spec.get("kind") not in
                     ("quant", "lowrank", "lowrank_quant", "lowrank_sparse"))
    if unknown:
        raise UserError(f"module {unknown[0]}: kind {qc['modules'][unknown[0]].get('kind')!r} has no serving "
                        "format (use --dense)")


def _describe(args: dict) -> str:
    layout = "one scale per row" if args["strategy"] == "channel" else f"group {args['group_size']}"
    return f"{args['num_bits']}-bit, {layout}"


def _one_scheme(weight_args: dict[str, tuple], in_features: dict[str, int]) -> dict[str, tuple]:
    """The same compressed-tensors scheme for every module, or a UserError naming two that differ.

    transformers (5.24) cannot load several schemes from one checkpoint: with `dequantize: true` its loader
    (integrations/compressed_tensors.py, get_dense_scheme) unpacks every dense layer with the FIRST config group's
    scheme (measured: a 6-bit + 8-bit export loads the 8-bit weights off by 0.09); without it, asymmetric modules do
    not load at all (compressed-tensors 0.20.1 does not pack zero points on the meta device). Two differences are
    no second scheme and are written in the common one, exactly: a symmetric module among asymmetric ones (its
    zero points, 0, stored), and a module with one scale per row whose row is exactly one group of the others."""
    args_of = {name: dict(args) for name, (args, _) in weight_args.items()}
    if len({args["symmetric"] for args in args_of.values()}) > 1:
        for args in args_of.values():
            args["symmetric"] = False
    sizes = {args["group_size"] for args in args_of.values() if args["strategy"] == "group"}
    if len(sizes) == 1:
        (size,) = sizes
        for name, args in args_of.items():
            if args["strategy"] == "channel" and in_features[name] == size:
                args.update(strategy="group", group_size=size)
    first, *rest = args_of or [None]
    for name in rest:
        if args_of[name] != args_of[first]:
            raise UserError(f"modules {first} ({_describe(args_of[first])}) and {name} ({_describe(args_of[name])}) "
                            "need two compressed-tensors schemes, and transformers loads one per checkpoint: compress "
                            "with --set export=compressed-tensors (GPTQ of one width) or export --dense")
    return {name: (args_of[name], zero) for name, (_, zero) in weight_args.items()}


def export_serving(src, dst, *, overwrite: bool = False, max_shard_size: int | str = "2GB",
                   quantized_only: bool = False) -> ServingExport:
    """Write `dst/base/` (compressed-tensors, pack-quantized; low-rank modules dense) and, when some module has an
    EoRA residual, `dst/adapter/` (PEFT LoRA) from the lrc output `src`. `quantized_only`: refuse any output with a
    module that is not quantised (`--quantized-adapter`). UserError, with nothing written, for what the formats
    cannot hold or an unusable destination."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise UserError(f"export destination is the source checkpoint itself: {dst}")
    ea._check_export_destination(dst, overwrite)
    _refuse_unservable(src, quantized_only=quantized_only)
    flag = "--quantized-adapter" if quantized_only else "--serving"
    try:
        from compressed_tensors.compressors import ModelCompressor
        import peft  # noqa: F401  (checked up front: fail before any work, not half way)
    except ImportError as e:
        raise UserError(f"{flag} needs the optional packages peft and compressed-tensors "
                        f"(pip install 'lrc[export]'): {e}") from None

    with warnings.catch_warnings():  # the loader's inference-kernel warnings: nothing here runs a forward
        warnings.filterwarnings("ignore", message="QuantLinear: .* dequantise their weight on every forward")
        model = load_compressed(src)
    dtype = model.dtype
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    low_rank = [(n, m) for n, m in model.named_modules() if isinstance(m, DENSIFIED)]
    # Every refusal before the first swap: a ragged group is found on the loaded modules, not in the spec.
    weight_args = _one_scheme({name: ea._weight_args(module, name) for name, module in quantized},
                              {name: module.in_features for name, module in quantized})
    schemes, ranks, lora = {}, {}, {}
    for name, module in quantized:
        args, zero = weight_args[name]
        schemes[name] = args
        if module.rank:
            ranks[name] = module.rank
            for part in ("lora_A", "lora_B"):
                lora[f"base_model.model.{name}.{part}.weight"] = getattr(module, part).weight.detach().contiguous()
        replace_module(model, name, ea._pack_module(module, args, zero, dtype))
    before = after = 0
    for name, module in low_rank:
        before += stored_bytes(module, dtype)
        linear = dense_linear(module, dtype)
        after += stored_bytes(linear)
        replace_module(model, name, linear)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = ea._config_groups(schemes, linears)
    compressor = ModelCompressor(quantization_config=config)
    detach_lrc_quantizer(model)
    with atomic_output_dir(dst, overwrite) as tmp:
        (tmp / "base").mkdir()
        model.save_pretrained(tmp / "base", max_shard_size=max_shard_size)
        compressor.update_config(tmp / "base")  # the library writes its own quantization_config
        ea._dequantize_on_load(tmp / "base" / CONFIG_NAME)
        copy_tokenizer_files(src, tmp / "base")
        if ranks:
            ea._write_adapter(tmp / "adapter", lora, ranks, dst.resolve() / "base")
    return ServingExport(path=dst, base=dst / "base", adapter=dst / "adapter" if ranks else None,
                         quantized=len(schemes), scheme=_describe(next(iter(schemes.values()))), residuals=len(ranks),
                         densified=len(low_rank), densified_bytes=(before, after))
