"""Loading a dense (or lrc) checkpoint for compression or evaluation: the model, its tokenizer, the dtype it is
stored in, and the checks that turn a bad source into one line (missing folder, no config.json, corrupt weights,
NaN/Inf weights) before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from compressor.errors import UserError


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    storage_dtype: torch.dtype  # the checkpoint's dtype: outputs are saved in it


def resolve_dtype(name: str, device: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        # Half precision on CPU is slow and lossy for the fp64 maths around it: compute in fp32 there.
        return torch.float32 if str(device).startswith("cpu") else checkpoint_dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise UserError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16") from None


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(
    name_or_path: str, *, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
    keep_on_cpu: bool = False,
) -> LoadedModel:
    """A causal LM and its tokenizer from a local directory or a hub id (lrc checkpoints included).

    `device` is where it will compute (it decides dtype "auto"); with `keep_on_cpu` the weights stay in CPU
    memory so the layer-by-layer runner can move one decoder layer at a time to the device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise UserError(f"model path not found or not a directory: {name_or_path}")
    if looks_local and not (path / "config.json").is_file():
        raise UserError(f"not a model directory (no config.json): {name_or_path}")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        storage = checkpoint_dtype(config)
        compute = resolve_dtype(dtype, device, storage)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=compute, trust_remote_code=trust_remote_code
        ).to("cpu" if keep_on_cpu else device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, SafetensorError):
            reason = f"{_unreadable_weights(path) or 'a weight file'} is corrupt or truncated ({reason})"
        raise UserError(f"cannot load model '{name_or_path}': {reason}") from None
    model.eval()
    check_finite(model.named_parameters(), name_or_path)
    return LoadedModel(model, tokenizer, name_or_path, storage)


def _all_finite(t: torch.Tensor) -> bool:
    """isfinite in blocks of 16M elements: its boolean copy of a 150k-vocabulary head alone is 0.23 GB."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(block).all()) for block in flat.split(1 << 24))


def check_finite(named_tensors, source: str) -> None:
    """Refuse weights holding NaN or Inf before any work: every method would spread them, silently or not."""
    for name, t in named_tensors:
        if t.is_floating_point() and not t.is_meta and not _all_finite(t):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            what = " and ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "Inf")) if count)
            raise UserError(f"weight {name} of '{source}' holds {what} values; lrc needs finite weights")


def _unreadable_weights(folder: Path) -> str | None:
    """The name of the first .safetensors file of `folder` whose header safetensors cannot read."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError):
            return file.name
    return None


