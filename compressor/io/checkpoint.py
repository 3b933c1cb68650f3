"""Save and load compressed checkpoints.

Layout of an output directory (it loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)` once
`compressor` is imported — see hf_integration.py):
  config.json            the base model's config + `quantization_config` {"quant_method": "lrc", "lrc_version",
                         "method", "recipe", "modules": {module name: spec}}
  model.safetensors      (or model-0000k-of-0000n.safetensors + model.safetensors.index.json when large)
  generation_config.json, tokenizer files, and the caller's extra files (recipe.yaml, report.json, report.md)

Writes are atomic: everything goes to a hidden temporary directory next to `out_dir` (same filesystem) and is
renamed into place only when complete; on any error nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from torch import nn

from compressor.nn import hf_integration
from compressor.errors import UserError, out_of_space
from compressor.nn.modules import COMPRESSED_MODULES

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
_RESERVED = {CONFIG_NAME, "generation_config.json", "model.safetensors", INDEX_NAME}


def save_compressed(
    model: nn.Module,
    out_dir,
    *,
    tokenizer=None,
    modules: dict[str, dict] | None = None,
    method: str,
    recipe_name: str,
    extra_files: dict[str, str | bytes | Callable[[], str | bytes]] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write `model` (a transformers model whose compressed linears were swapped in place) to `out_dir`.

    `modules` is the {name: spec} table of compressed modules; it must match the model exactly (it is derived
    from the model when None). Returns the output path."""
    out_dir = Path(out_dir)
    check_destination(out_dir, overwrite)
    _module_table(model, modules)  # a mismatch is found before anything is written
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_checkpoint(tmp, model, modules=modules, method=method, recipe_name=recipe_name, tokenizer=tokenizer,
                         extra_files=extra_files, max_shard_size=max_shard_size)
    return out_dir


def write_checkpoint(folder: Path, model: nn.Module, *, modules: dict[str, dict] | None, method: str,
                     recipe_name: str, tokenizer=None, extra_files: dict | None = None,
                     max_shard_size: int | str = "2GB", written: dict[str, str] | None = None) -> None:
    """The one writer of lrc checkpoints, into `folder` (a temporary directory the caller renames into place).

    The weights: `model.save_pretrained`, or — `written` = {tensor name: shard file} of weights already in `folder`
    (a --low-memory run writes each decoder layer's shard as it finishes) — only their index. Then config.json with
    lrc's quantization_config, generation config, tokenizer, and `extra_files` (name -> str | bytes | callable
    giving one, called last: a report can include the save time)."""
    folder = Path(folder)
    table = _module_table(model, modules)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        parts = Path(name).parts
        plain = len(parts) == 1 or (len(parts) == 2 and parts[0] == "plots")  # report images live in plots/
        if not plain or ".." in parts or name in _RESERVED or name.endswith(".safetensors"):
            raise ValueError(f"extra file name {name!r} must be a plain file name (or plots/NAME) that is not a "
                             "checkpoint file")
    if written is None:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        total = sum((folder / f).stat().st_size for f in set(written.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(written.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
    _write_quantization_config(model, folder / CONFIG_NAME, table, method, recipe_name)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_extra_files(folder, extra_files)


def write_extra_files(folder: Path, files: dict) -> None:
    """name -> str | bytes | callable returning one (called last-minute: a report can include the save time)."""
    for name, content in files.items():
        content = content() if callable(content) else content
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def load_compressed(path, *, dtype=None, device=None, fuse_siblings=False):
    """Load an lrc checkpoint directory. `dtype`: None keeps the checkpoint's dtype; `device`: e.g. "cuda:0".
    Strict: any missing, unexpected or mismatched weight is an error. `fuse_siblings`: low-rank linears that read
    the same input (q/k/v, gate/up) share one GEMM for their A factors (compressor.nn.modules.fuse_siblings; no stored
    tensor changes)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    qc = read_quantization_config(path)
    hf_integration.register()  # no-op after `import compressor`; makes this function safe to call on its own
    model, info = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype if dtype is not None else "auto",
        device_map={"": device} if device is not None else None,
        output_loading_info=True,
    )
    problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise UserError(f"checkpoint {path} does not match its config ({detail or info['error_msgs'][0]})")
    loaded = compressed_modules(model)
    if loaded != qc["modules"]:
        raise UserError(f"checkpoint {path}: compressed modules after loading differ from its quantization_config")
    if fuse_siblings:
        from compressor.nn.modules import fuse_siblings as fuse

        fuse(model)
    return model


def read_quantization_config(path) -> dict:
    """The `quantization_config` section of an lrc checkpoint; UserError when `path` is not one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"not a directory: {path}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"not a model checkpoint (no {CONFIG_NAME}): {path}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {config_file}: {e}") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != hf_integration.QUANT_METHOD:
        raise UserError(f"not an lrc checkpoint (config.json has no lrc quantization_config): {path}")
    if not isinstance(qc.get("modules"), dict):
        raise UserError(f"lrc checkpoint {path} has no modules table in its quantization_config")
    try:
        hf_integration.LrcConfig.from_dict(qc)
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"lrc checkpoint {path}: {e}") from None
    return qc


def checkpoint_bytes(path) -> int:
    """Bytes of the weight files (*.safetensors) of a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors") if f.is_file())


def tensor_data_bytes(path) -> int:
    """Bytes of tensor data in the *.safetensors files of a checkpoint directory: each file less its 8-byte header
    length and its JSON header (what a report's weight bytes count)."""
    total = 0
    for f in Path(path).glob("*.safetensors"):
        with f.open("rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - header
    return total


def compressed_modules(model: nn.Module) -> dict[str, dict]:
    """{module name: spec} of every compressed module in `model`."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, COMPRESSED_MODULES)}


def _module_table(model: nn.Module, modules: dict[str, dict] | None) -> dict[str, dict]:
    found = compressed_modules(model)
    if modules is None:
        return found
    table = {name: dict(spec) for name, spec in modules.items()}
    if table != found:
        missing = sorted(set(found) - set(table))
        extra = sorted(set(table) - set(found))
        differ = sorted(n for n in set(table) & set(found) if table[n] != found[n])
        raise ValueError(
            f"modules table does not match the model: compressed but not listed {missing[:5]}, listed but not "
            f"compressed {extra[:5]}, spec differs {differ[:5]}"
        )
    return table


def _write_quantization_config(model, config_file: Path, table, method: str, recipe_name: str) -> None:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["quantization_config"] = hf_integration.LrcConfig(modules=table, method=method, recipe=recipe_name).to_dict()
    hf_integration.mark_config(config)  # unloadable without lrc, never silently random (see hf_integration.py)
    # A compressed output embedding can no longer be tied to the (dense) input embedding: both are saved and
    # must be loaded separately.
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    tied |= set((getattr(model, "all_tied_weights_keys", None) or {}).values())
    if any(f"{name}.weight" in tied for name in table):
        if "tie_word_embeddings" not in config:
            raise ValueError("a compressed module is tied to another weight, and config.json has no tie flag to clear")
        config["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_destination(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise UserError(f"output directory exists: {out_dir} (pass --overwrite to replace it)")
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise UserError(f"output path exists and is not a directory: {out_dir}")
    # --overwrite replaces a previous checkpoint, never an arbitrary folder (a typo must not delete $HOME).
    if any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).is_file():
        raise UserError(f"refusing to overwrite {out_dir}: it is not empty and holds no model checkpoint")


@contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary directory next to `out_dir`; on success it becomes `out_dir` (replacing an old
    checkpoint with `overwrite`), on any error it is removed: nothing half-written is ever left behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        publish(tmp, out_dir, overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = out_of_space(exc, out_dir)
        if full is not None:
            raise full from None
        raise


def _apply_umask(folder: Path) -> None:
    """mkdtemp (and some writers) create private 0700/0600 entries; give the result the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not overwrite:  # appeared while we were writing
        raise UserError(f"output directory exists: {out_dir} (pass --overwrite to replace it)")
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, old / "ckpt")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old / "ckpt", out_dir)  # put the previous checkpoint back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Make a complete temporary directory (written outside `atomic_output_dir`, e.g. a journaled run's) `out_dir`."""
    _apply_umask(tmp)
    _move_into_place(tmp, Path(out_dir), overwrite)
