"""Compress a checkpoint larger than memory: weights stay on disk until their decoder layer is needed.

    from compressor.pipeline.streaming import compress_streaming
    compress_streaming("path/or/hub-id", "svd-llm-20", "out/")

How (CLI: `lrc compress ... --low-memory`):
  1. the model is built on the meta device (no memory); only the parts outside the decoder layers (embeddings,
     final norm, head, rotary tables) are read from the checkpoint's safetensors;
  2. the layer-by-layer runner (compressor/pipeline/sequential.py) asks `LazyLayers.load(i)` for decoder layer i just
     before it is used: its tensors are read from the memory-mapped safetensors files, cast to the compute dtype;
  3. when the runner is done with layer i (statistics, decomposition, outputs for layer i+1), `done(i)` writes
     its compressed tensors, in the storage dtype, to output shard i and sends the layer back to the meta device;
  4. the last shard holds the rest of the model; the index, config (with lrc's quantization_config), tokenizer
     and report are written, and the temporary directory is renamed into place (atomic, like compressor/io/checkpoint.py).
Resident at any time: one decoder layer (plus its compressed copy while it is written), the non-layer weights,
the calibration activations of one layer (nsamples × seqlen × hidden, twice), and that layer's statistics. The
output is the same checkpoint `CompressionResult.save` writes (tests compare them tensor for tensor).

The Fisher pass (`fwsvd`) runs first, reading each layer from disk twice per calibration chunk (`read`/`release`;
compressor/pipeline/fisher.py), while the embeddings and head are still loaded. Not streamable (refused with one line,
before any work): rank allocation other than uniform (it needs every layer's spectrum up front).
"""

from __future__ import annotations

import ctypes
import gc
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from compressor.errors import UserError
from compressor.io.checkpoint import (CONFIG_NAME, INDEX_NAME, atomic_output_dir, check_destination, publish,
                                      write_checkpoint)
from compressor.io.load import check_finite, checkpoint_dtype, resolve_dtype
from compressor.pipeline import distributed
from compressor.pipeline.compression import compress_model
from compressor.pipeline.journal import fault
from compressor.pipeline.result import calibration_data
from compressor.pipeline.targets import find_decoder_layers, layers_detached
from compressor.recipe import as_recipe
from compressor.report.summary import count_parameters, state_bytes


class CheckpointFiles:
    """tensor name -> safetensors file of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            with _readable(folder / "model.safetensors") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}
        else:
            raise UserError(f"--low-memory needs safetensors weights; none found in {folder}")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise UserError(f"checkpoint {self.folder} has no tensor '{missing[0]}' (its names must match the "
                            "model's modules for --low-memory)")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, members in by_file.items():
            with _readable(file) as f:
                out.update({name: f.get_tensor(name) for name in members})
        return out


@contextmanager
def _readable(file: Path):
    """safe_open(file), a corrupt or truncated file being the user's one-line error."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise UserError(f"cannot read {file.name} in {file.parent}: corrupt or truncated ({exc})") from None


def _materialize(module: nn.Module, prefix: str, files: CheckpointFiles, dtype: torch.dtype, skip=()) -> None:
    """Replace `module`'s meta parameters (and persistent buffers) by the checkpoint's tensors, in place: the
    module objects stay the same, so target lists made on the meta model still point at them."""
    from accelerate.utils import set_module_tensor_to_device

    wanted = [name for name, t in module.state_dict(keep_vars=True).items() if t.is_meta and name not in skip]
    for name in wanted:  # one tensor at a time: a 150k-vocabulary embedding is 0.5 GB bf16 + 0.9 GB fp32 alone
        value = files.read([prefix + name])[prefix + name]
        check_finite([(prefix + name, value)], str(files.folder))
        value = value.to(dtype) if value.is_floating_point() else value
        set_module_tensor_to_device(module, name, "cpu", value=value, dtype=value.dtype)
        del value


class LazyLayers:
    """The runner's `layer_io`: loads decoder layer i from the checkpoint, writes it to shard i when done."""

    def __init__(self, model: nn.Module, files: CheckpointFiles, layers_path: str, n_layers: int, dtype: torch.dtype,
                 storage_dtype: torch.dtype, out_dir: Path):
        self.model, self.files, self.path, self.n = model, files, layers_path, n_layers
        self.dtype, self.storage = dtype, storage_dtype
        self.out_dir = out_dir
        self.weight_map: dict[str, str] = {}
        self.seconds = {"load": 0.0, "save": 0.0}

    def shard_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.n + 1:05d}.safetensors"

    def _untied(self):
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        untied = head is not None and getattr(head, "weight", None) is not getattr(embedding, "weight", None)
        return head, embedding, untied

    @contextmanager
    def embedding_released(self):
        """For the Fisher pass, once it has captured every chunk's first-layer inputs: an untied embedding waits on
        disk until the pass is over (then it is read again), so that it and the head are never both in memory."""
        head, embedding, untied = self._untied()
        if untied:
            embedding.to("meta")
            release_freed_memory()
        try:
            yield
        finally:
            if untied:
                self._read_outside(self.dtype, skip=_names_of(self.model, head))

    @contextmanager
    def head_resident(self):
        """The head, which the skeleton leaves on meta, read in the checkpoint's dtype for one use (the Fisher
        pass's head gradient of one chunk, which casts it a vocabulary slice at a time) and then sent back: during
        the decoder layers' passes it is not in memory."""
        head, embedding, untied = self._untied()
        deferred = untied and any(t.is_meta for t in head.parameters())
        if deferred:
            dtype = self.storage if type(head) is nn.Linear else self.dtype
            self._read_outside(dtype, skip=_names_of(self.model, embedding))
        try:
            yield
        finally:
            if deferred:
                head.to("meta")
                release_freed_memory()

    def _read_outside(self, dtype, skip) -> None:
        t0 = time.perf_counter()
        with layers_detached(self.model):
            _materialize(self.model, "", self.files, dtype, skip=_tied_not_stored(self.model, self.files) | skip)
        self.seconds["load"] += time.perf_counter() - t0

    def load(self, index: int, layer: nn.Module) -> None:
        t0 = time.perf_counter()
        if index == 0:
            # The first layer's inputs are captured: nothing outside the layers runs again (the captured call
            # arguments hold the position embeddings), and the output copies those tensors from the checkpoint.
            _, layers = find_decoder_layers(self.model)
            _release_all_but(self.model, layers)
        self.seconds["load"] += time.perf_counter() - t0
        self.read(index, layer)

    def resume(self, done: int) -> None:
        """Layers 0..done-1 were written by an interrupted run into this output directory: take their shards."""
        if not distributed.is_writer():  # under torchrun rank 0 alone writes the output
            return
        for index in range(done):
            name = self.shard_name(index)
            with safe_open(self.out_dir / name, framework="pt") as f:
                self.weight_map.update(dict.fromkeys(f.keys(), name))

    def read(self, index: int, layer: nn.Module) -> None:
        """Materialise layer i for a pass that only reads it (the Fisher pass), leaving everything else alone."""
        t0 = time.perf_counter()
        _materialize(layer, f"{self.path}.{index}.", self.files, self.dtype)
        self.seconds["load"] += time.perf_counter() - t0

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")
        release_freed_memory()

    def done(self, index: int, layer: nn.Module) -> None:
        t0 = time.perf_counter()
        layer.to(self.storage)  # compressed modules keep their own dtypes for scales and codes
        self.write(index, {f"{self.path}.{index}.{k}": v for k, v in layer.state_dict().items()})
        self.seconds["save"] += time.perf_counter() - t0
        self.release(index, layer)

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        name = self.shard_name(shard)
        if not distributed.is_writer():  # (every rank holds the same layer: rank 0 alone writes it)
            return
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.out_dir / name),
                  metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))


def _names_of(model: nn.Module, module: nn.Module) -> set[str]:
    """The state-dict names of `module`'s tensors inside `model`."""
    prefix = next(name for name, m in model.named_modules() if m is module)
    return {f"{prefix}.{name}" for name in module.state_dict()}


def _release_all_but(model: nn.Module, keep: nn.Module) -> None:
    kept = {id(t) for t in [*keep.parameters(), *keep.buffers()]}
    model._apply(lambda t: t if id(t) in kept else t.to("meta"))
    release_freed_memory()


def bound_heap_fragmentation() -> None:
    """Serve every allocation above 1 MiB by mmap, so that freeing it returns it to the OS at once. glibc's default
    threshold grows with each large block freed (up to 32 MiB), after which a layer's many 1-32 MiB temporaries
    (batch activations, Gram column blocks) fragment the heap: measured on Qwen2.5-1.5B --low-memory, a layer's
    peak RSS 2.27 → 2.10 GB. Linux/glibc only; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps fragments of freed tensors below its mmap threshold,
    hundreds of MB per 1B-sized layer); no-op elsewhere."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _local_checkpoint(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise UserError(f"model path not found or not a directory: {name_or_path}")
    from huggingface_hub import snapshot_download

    try:  # only what a layer-wise load needs: configs, tokenizer files, safetensors
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                  "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 (network, auth, missing repo: one line for the user)
        raise UserError(f"cannot download '{name_or_path}': {str(exc).splitlines()[0]}") from None


class Skeleton(NamedTuple):
    model: nn.Module  # on the meta device except its non-layer parts (an untied head: read only for the Fisher pass's head gradient)
    tokenizer: object
    files: CheckpointFiles
    storage_dtype: torch.dtype
    layers_path: str
    n_layers: int


def _tied_not_stored(model: nn.Module, files: CheckpointFiles) -> set:
    """A tied head is not in the checkpoint (only the embedding it shares): skipped, re-tied after loading."""
    return {k for k in (getattr(model, "all_tied_weights_keys", None) or {}) if k not in files.files}


def load_skeleton(name_or_path: str, *, dtype: str = "auto", device: str = "cpu", trust_remote_code=False) -> Skeleton:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    bound_heap_fragmentation()
    folder = _local_checkpoint(name_or_path)
    if not (folder / CONFIG_NAME).is_file():
        raise UserError(f"not a model directory (no config.json): {name_or_path}")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise UserError(f"{name_or_path} is already quantized/compressed; --low-memory needs a dense checkpoint")
    storage = checkpoint_dtype(config)
    compute = resolve_dtype(dtype, device, storage)
    files = CheckpointFiles(folder)
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=compute, trust_remote_code=trust_remote_code)
    model.eval()
    tied = _tied_not_stored(model, files)
    # An untied head (vocabulary × hidden, 0.9 GB fp32 for Qwen2.5-1.5B) is not needed to capture the first layer's
    # inputs, nor for the output (copied from the checkpoint): read later, by a pass that runs the whole model.
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    deferred = set()
    if head is not None and getattr(head, "weight", None) is not getattr(embedding, "weight", None):
        deferred = _names_of(model, head)
    with layers_detached(model) as (path, layers):  # everything but the layers and the head: read now
        _materialize(model, "", files, compute, skip=tied | deferred)
    if tied:
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return Skeleton(model, tokenizer, files, storage, path, len(layers))


def compress_streaming(model_name: str, recipe, out, *, overrides=(), calib=None, batches=None, device="cpu",
                       dtype="auto", overwrite=False, trust_remote_code=False, progress=None, report_fn=None,
                       skeleton=None, calibration_info=None, journal=None):
    """Compress `model_name` (local dir or hub id) to `out` holding one decoder layer at a time: the Python API of
    `--low-memory` (the CLI's run is compressor/pipeline/run.py). `recipe`: a Recipe, a built-in name or a path.

    `report_fn(result, model, storage_dtype, (params, bytes) before) -> (report dict, report_md, extra files)`,
    report_md the markdown or a function of the report giving it, adds the report to the output; `skeleton`: a
    `load_skeleton` result already in hand. `journal` (compressor/pipeline/journal.py): its folder is where the
    output is written (the shards finished before an interruption are kept there), and the run resumes from it.
    Returns (CompressionResult, output path)."""
    out = Path(out)
    check_destination(out, overwrite)
    recipe = as_recipe(recipe, overrides)
    t0 = time.perf_counter()
    model, tok, files, storage, path, n_layers = skeleton or load_skeleton(
        model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    load_seconds = time.perf_counter() - t0
    before = (count_parameters(model), state_bytes(model, storage))
    if batches is None:
        batches, calibration_info = calibration_data(tok, recipe, calib)

    def write_into(tmp: Path):
        compute = next(model.get_input_embeddings().parameters()).dtype
        lazy = LazyLayers(model, files, path, n_layers, compute, storage, tmp)
        result = compress_model(model, recipe, batches=batches, device=device, storage_dtype=storage,
                                progress=progress, layer_io=lazy, journal=journal)
        result.timings["load"] = load_seconds + lazy.seconds["load"]
        result.calibration = calibration_info or {}
        finish_streamed(model, result, lazy, tmp, tok, storage,
                        report_fn and (lambda r: report_fn(r, model, storage, before)))
        return result

    if journal is None:
        with atomic_output_dir(out, overwrite) as tmp:
            result = write_into(tmp)
    else:
        with journal.kept_on_failure():
            result = write_into(journal.folder)
            journal.close_out()
            publish(journal.folder, out, overwrite)
    return result, out


def finish_streamed(model, result, lazy: LazyLayers, tmp: Path, tokenizer, storage, report_fn=None) -> dict | None:
    """Write what lies outside the decoder layers (the last shard), then the index, config, tokenizer and, with
    `report_fn(result) -> (report, report_md, extra files)`, the report; returns the report."""
    start = time.perf_counter()
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # not stored (as save_pretrained): loading re-ties
    # Outside the layers nothing changed: copy from the checkpoint (d -> storage equals d -> fp32 -> storage).
    names = [k for k in model.state_dict() if not k.startswith(lazy.path + ".") and k not in tied]
    rest = {k: v.to(storage) if v.is_floating_point() else v for k, v in lazy.files.read(names).items()}
    lazy.write(lazy.n, rest)
    fault("final-write")
    model.config.dtype = storage
    extra = {"recipe.yaml": result.recipe.to_yaml()}
    report = None
    if report_fn is not None:
        result.timings["save"] = lazy.seconds["save"] + time.perf_counter() - start
        report, report_md, files = report_fn(result)
        markdown = (lambda: report_md(report)) if callable(report_md) else report_md
        extra.update({"report.json": json.dumps(report, indent=2), "report.md": markdown, **files})
    write_checkpoint(tmp, model, modules=result.specs(), method=result.recipe.method, recipe_name=result.recipe.name,
                     tokenizer=tokenizer, extra_files=extra, written=lazy.weight_map)
    result.timings["save"] = lazy.seconds["save"] + time.perf_counter() - start
    return report
