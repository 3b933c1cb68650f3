"""Export an lrc checkpoint as a plain dense transformers checkpoint (loads without lrc; no smaller than the base).

    from compressor.io.export import export_dense
    export_dense("out/", "dense/")

Every compressed module becomes an `nn.Linear` whose weight is the module's `dense_weight()` (B·A for low rank,
dequantized W + lora_B·lora_A for quantized+EoRA; computed in fp64) cast to the model dtype, with the module's
bias. `quantization_config` is dropped from config.json. Tokenizer files are copied as they are. The write is
atomic, like compressor.io: a hidden temporary directory next to the destination, renamed into place when
complete, removed on any error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from compressor.errors import UserError
from compressor.io.checkpoint import CONFIG_NAME, check_destination, atomic_output_dir, load_compressed
from compressor.nn.modules import COMPRESSED_MODULES

# Tokenizer and chat-template files of a checkpoint directory, copied verbatim.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")


def _bias(module: nn.Module):
    """A compressed module's bias: its own `bias` (QuantLinear) or its output factor's (`B.bias`: the low-rank
    modules). Works for any module kind that follows one of the two layouts of compressor.nn.modules."""
    bias = getattr(module, "bias", None)
    if bias is None and isinstance(getattr(module, "B", None), nn.Linear):
        bias = module.B.bias
    return bias


@torch.no_grad()
def dense_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """The nn.Linear equal to the compressed `module`: its `dense_weight()` (computed in fp64) rounded once to
    `dtype`, and its bias."""
    bias = _bias(module)
    weight = module.dense_weight()
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, dtype=dtype,
                       device=weight.device)
    linear.weight.copy_(weight.to(dtype))
    if bias is not None:
        linear.bias.copy_(bias.to(dtype))
    return linear


def densify(model: nn.Module) -> int:
    """Swap every compressed module of `model` for an equivalent nn.Linear, in place; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, COMPRESSED_MODULES)]
    for name in names:
        replace_module(model, name, dense_linear(model.get_submodule(name), model.dtype))
    return len(names)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def export_dense(src, out_dir, *, overwrite: bool = False, max_shard_size: int | str = "2GB") -> tuple[Path, int]:
    """Write the dense equivalent of the lrc checkpoint `src` to `out_dir`. Returns (out_dir, modules densified)."""
    src, out_dir = Path(src), Path(out_dir)
    if src.resolve() == out_dir.resolve():
        raise UserError(f"export destination is the source checkpoint itself: {out_dir}")
    check_destination(out_dir, overwrite)
    model = load_compressed(src)  # UserError when src is not an lrc checkpoint
    count = densify(model)
    detach_lrc_quantizer(model)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        config_file = tmp / CONFIG_NAME
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.pop("quantization_config", None) is not None:  # belt and braces: never a half-lrc config
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copy_tokenizer_files(src, tmp)
    return out_dir, count


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def detach_lrc_quantizer(model: nn.Module) -> None:
    """The model no longer holds lrc modules: save_pretrained must not write lrc's quantization_config."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
