"""Resumable runs: a journal of finished decoder layers, kept next to the output while it is being made.

    journal = Journal.open(Path("out"), identity, resume=True)   # `lrc compress ... -o out --resume`
    api.compress(model, recipe, batches=batches, journal=journal)

Layout of `.OUT.partial/` (beside OUT, same filesystem):
  journal.json              {"identity": ..., "done": k, "stream": "stream-0000k.safetensors", "state": {...}}
  stream-0000k.safetensors  the activations layer k needs (the compressed stream, and the dense one when the run
                            keeps it), one tensor per calibration batch, exactly as the runner held them; none once
                            the last layer is done (nothing reads them again)
  layer-0000i.safetensors   layer i as compressed, in the checkpoint's dtype (in-memory runs; a --low-memory run
                            writes its output shards here instead, and they are the output's own)
`done` only moves once the files it names are complete and on disk (each is written under a temporary name,
fsynced, renamed, and the directory fsynced; the journal last), so a run killed at any instant (SIGKILL or a power
cut included) resumes from the last finished layer. A layer is kept in the checkpoint's dtype: the run rounds every
parameter through that dtype at its end anyway (compression.py, `_round_through`), so the resumed run's tensors are
still identical to an uninterrupted run's. A journal whose identity (recipe, model content and hub revision,
calibration data, device, dtype, mode, lrc and torch versions) differs from the new run's is refused, never mixed.

Disk, beside the output: the finished layers (in-memory runs: at most the source's decoder layers, in its dtype) and
one set of activations, nsamples × seqlen × hidden × the compute dtype's bytes (twice that with the dense stream).
While layer k's set is written, layer k-1's is still the only complete one and is kept until the journal names the
new one: for that moment there are two sets. Fewer cannot survive a crash: overwriting the one set in place would
leave a torn set, and the previous layer cannot be rerun exactly from the journal (its weights are kept rounded).
Leftovers of a killed switch (the half-written set, or the old one) are removed when the run is resumed.
`journal_bytes` is this peak, which the pre-flight adds to the output's size.

One run per output: the run holds `.OUT.lock` (compressor/io/lock.py), and a journal is never opened, nor its
stale temporary directories removed, while another live process holds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compressor import __version__, registry
from compressor.errors import UserError, out_of_space
from compressor.io.fingerprint import checkpoint_fingerprint
from compressor.io.lock import busy_error, lock_holder

JOURNAL_NAME = "journal.json"
FORMAT = 2
# Fault injection for the crash tests (tests/test_resume_cli.py): LRC_FAULT=<point> kills this process with SIGKILL
# when the run reaches that point ("before-layers", "after-layer:N", "final-write"); LRC_FAULT=SIGINT@<point> sends
# it a SIGINT there instead (a Ctrl-C). Unset in normal use.
FAULT_ENV = "LRC_FAULT"
_DTYPES_KEY = "lrc_dtypes"  # safetensors metadata of a layer file: the dtypes its rounded tensors had in the run
_INFORMATIVE = ("source",)  # identity entries kept for messages, not compared


def fault(point: str) -> None:
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted == f"SIGINT@{point}":
        # Python's Ctrl-C handler, even where the parent ignored SIGINT (a shell's background job: `cmd &`), which a
        # child inherits and Python then leaves ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGINT)


def refuse_leftover(out, resume: bool) -> None:
    """Before any work: a leftover partial run of `out` with finished layers, and no --resume, is refused."""
    folder = partial_dir(out)
    entry = _read_entry(folder) if folder.is_dir() else None
    if entry is not None and entry["done"] > 0 and not resume:
        raise UserError(f"an interrupted run of {out} was left in {folder} ({entry['done']} decoder layers "
                        "done): pass --resume to finish it, or delete that directory to start again")


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def fingerprint_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass
class Resumed:
    """Where a journaled run stands: `done` layers finished, the activations layer `done` needs, and the caller's
    JSON state (module reports, refinement) as it was after that layer."""

    done: int
    hidden: list[torch.Tensor]
    dense_hidden: list[torch.Tensor] | None
    state: dict


class Journal:
    def __init__(self, folder: Path, identity: dict, storage_dtype: torch.dtype | None = None,
                 layers: int | None = None):
        self.folder, self.identity = Path(folder), identity
        self.storage_dtype, self.layers = storage_dtype, layers
        self._entry: dict | None = None
        self._synced: set[str] = set()

    @classmethod
    def open(cls, out, identity: dict, *, resume: bool, storage_dtype: torch.dtype | None = None,
             layers: int | None = None) -> "Journal":
        """The journal of a run writing `out`: a fresh one, or (with `resume`) the interrupted run's. A leftover
        partial run without `resume` is refused with the hint, as is resuming a different run, and any journal
        while another live process holds `out`'s lock. `storage_dtype`: the checkpoint's dtype, in which finished
        layers are kept (None: as the run holds them). `layers`: the model's decoder layers (the last one's
        outputs are not kept); None: unknown."""
        holder = lock_holder(out)
        if holder is not None and holder != os.getpid():
            raise busy_error(out, holder)
        folder = partial_dir(out)
        refuse_leftover(out, resume)
        for stale in Path(out).parent.glob(f".{Path(out).name}.tmp-*"):  # a final write killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        journal = cls(folder, identity, storage_dtype, layers)
        if folder.exists():
            entry = _read_entry(folder)
            if entry is not None and entry["done"] > 0:
                _check_identity(entry.get("identity", {}), identity, folder)
                journal._entry = entry
                journal._remove_leftovers()
                return journal
            shutil.rmtree(folder)  # killed before its first layer finished: nothing worth keeping
        folder.mkdir(parents=True)
        journal._write_entry({"format": FORMAT, "identity": identity, "done": 0, "stream": None, "state": {}})
        return journal

    @property
    def done(self) -> int:
        return (self._entry or {}).get("done", 0)

    @contextmanager
    def kept_on_failure(self):
        """Inside the block, a failure (Ctrl-C included) keeps the journal when a layer is finished, and says how to
        resume; with nothing finished the partial directory is removed."""
        try:
            yield self
        except BaseException as exc:
            if getattr(exc, "lrc_journal", False):  # an inner guard of this journal has handled it
                raise
            full = out_of_space(exc, self.folder)
            if self.done == 0:
                self.discard()
                if full is not None:
                    full.lrc_journal = True
                    raise full from None
                exc.lrc_journal = True
                raise
            hint = (f"the {self.done} finished decoder layers are kept in {self.folder}: rerun the same command "
                    "with --resume to finish")
            if isinstance(exc, UserError) or full is not None:
                error = UserError(f"{full or exc} ({hint})")
                error.lrc_journal = True
                raise error from None
            exc.lrc_hint, exc.lrc_journal = hint, True  # the CLI prints the hint (see cli._App)
            raise

    def resumed(self) -> Resumed | None:
        """What the interrupted run had finished, or None when no layer was."""
        entry = self._entry
        if entry is None or entry["done"] == 0:
            return None
        count = entry["batches"]
        if entry["stream"] is None:  # the last layer is done: no layer reads its outputs, stand-ins keep the count
            hidden = [torch.empty(0) for _ in range(count)]
            return Resumed(entry["done"], hidden, list(hidden) if entry["dense"] else None, entry["state"])
        tensors = load_file(self.folder / entry["stream"])
        hidden = [tensors[f"hidden.{b}"] for b in range(count)]
        dense = [tensors[f"dense.{b}"] for b in range(count)] if "dense.0" in tensors else None
        return Resumed(entry["done"], hidden, dense, entry["state"])

    def layer_file(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    def layer_tensors(self, index: int, prefix: str) -> dict[str, torch.Tensor]:
        """Layer `index` as the interrupted run left it (rounded through the checkpoint's dtype, back in the dtypes
        the run held), names relative to the layer (`prefix` removed)."""
        from safetensors import safe_open

        with safe_open(self.layer_file(index), framework="pt") as f:
            dtypes = json.loads((f.metadata() or {}).get(_DTYPES_KEY, "{}"))
        tensors = load_file(self.layer_file(index))
        return {k.removeprefix(prefix): v.to(getattr(torch, dtypes[k])) if k in dtypes else v
                for k, v in tensors.items()}

    def record(self, done: int, hidden: list[torch.Tensor], dense_hidden: list[torch.Tensor] | None, state: dict,
               layer_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Layers 0..done-1 are finished: keep `layer_tensors` (layer done-1, when the output does not already
        hold it), the activations for layer `done`, and the caller's `state`; then move the journal on."""
        if layer_tensors is not None:
            tensors, dtypes = _in_storage_dtype(layer_tensors, self.storage_dtype)
            _atomic_save(tensors, self.layer_file(done - 1), {_DTYPES_KEY: json.dumps(dtypes)})
        else:
            self._sync_output_shards()  # a --low-memory run's shard of this layer, written by its layer_io
        name = None
        if self.layers is None or done < self.layers:
            stream = {f"hidden.{b}": h for b, h in enumerate(hidden)}
            if dense_hidden is not None:
                stream.update({f"dense.{b}": h for b, h in enumerate(dense_hidden)})
            name = f"stream-{done:05d}.safetensors"
            _atomic_save(stream, self.folder / name)
        previous = (self._entry or {}).get("stream")
        self._write_entry({"format": FORMAT, "identity": self.identity, "done": done, "stream": name,
                           "batches": len(hidden), "dense": dense_hidden is not None, "state": state})
        if previous and previous != name:
            (self.folder / previous).unlink(missing_ok=True)
        fault(f"after-layer:{done}")

    def close_out(self) -> None:
        """The output is about to take the folder's place (a --low-memory run) or be written elsewhere: remove
        what only a resume needs."""
        for path in self.folder.iterdir():
            if path.name == JOURNAL_NAME or path.name.startswith(("stream-", "layer-")):
                path.unlink()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """What a run killed between two records left beside the files the journal names: a half-written file, the
        activations the journal had just stopped naming, layers past `done`."""
        entry = self._entry
        for path in self.folder.iterdir():
            name = path.name
            stale = name.endswith(".tmp") or (name.startswith("stream-") and name != entry["stream"]) or \
                (name.startswith("layer-") and int(name[6:11]) >= entry["done"])
            if stale:
                path.unlink(missing_ok=True)

    def _sync_output_shards(self) -> None:
        for path in sorted(self.folder.iterdir()):
            if path.name.endswith(".safetensors") and not path.name.startswith(("stream-", "layer-")) \
                    and path.name not in self._synced:
                _fsync_file(path)
                self._synced.add(path.name)
        _fsync_dir(self.folder)

    def _write_entry(self, entry: dict) -> None:
        tmp = self.folder / (JOURNAL_NAME + ".tmp")
        try:
            tmp.write_text(json.dumps(entry, indent=1), encoding="utf-8")
            _fsync_file(tmp)
            os.replace(tmp, self.folder / JOURNAL_NAME)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise out_of_space(exc, self.folder) or exc from None
        self._entry = entry


def _in_storage_dtype(tensors: dict[str, torch.Tensor], storage: torch.dtype | None):
    """The tensors wider than the checkpoint's dtype, rounded to it, and the dtypes they had. Exact for the run's
    result: it rounds every parameter through `storage` at its end, and writes its output in `storage`."""
    if storage is None:
        return tensors, {}
    width = torch.empty((), dtype=storage).element_size()
    out, dtypes = {}, {}
    for name, t in tensors.items():
        if t.is_floating_point() and t.element_size() > width:
            out[name], dtypes[name] = t.to(storage), str(t.dtype).removeprefix("torch.")
        else:
            out[name] = t
    return out, dtypes


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", **(metadata or {})})
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:  # noqa: BLE001 (safetensors' own error type carries the OS error)
        raise out_of_space(exc, path.parent) or exc from None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Makes the renames in `folder` durable; a filesystem that cannot fsync a directory (some network ones) is
    left to its own guarantees."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_entry(folder: Path) -> dict | None:
    path = folder / JOURNAL_NAME
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"the journal of the interrupted run in {folder} is unreadable; delete that directory "
                        "to start again") from None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise UserError(f"{folder} holds a journal of another lrc version; delete it to start again")
    return entry


def _check_identity(old: dict, new: dict, folder: Path) -> None:
    differ = [key for key in sorted(set(old) | set(new)) if key not in _INFORMATIVE and old.get(key) != new.get(key)]
    if {"model", "model revision"} & set(differ):
        name = new.get("source", "the model")
        raise UserError(f"cannot resume: the model {name} is not the one the interrupted run in {folder} read (its "
                        "weights, config or hub revision changed); delete that directory to start again")
    if differ:
        raise UserError(f"cannot resume: the {', '.join(differ)} differ from the interrupted run's in {folder} "
                        "(rerun with the same settings, or delete that directory to start again)")


def run_identity(recipe, model_name: str, batches: torch.Tensor, *, device: str, dtype: str, low_memory: bool) -> dict:
    """What must match for a journal to be resumed: everything that decides the output's tensors."""
    return {"recipe": hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:16],
            **checkpoint_fingerprint(model_name), "source": str(model_name),
            "calibration data": fingerprint_tensor(batches), "device": str(device), "dtype": dtype,
            "mode": "low-memory" if low_memory else "in-memory", "lrc version": __version__,
            "torch version": torch.__version__}


def journal_bytes(model_name: str, source_bytes: int | None, recipe, *, low_memory: bool, device: str,
                  dtype: str) -> int:
    """Disk the journal takes beside the output at the run's peak (see the module docstring), for the pre-flight:
    an in-memory run's finished layers (at most the source's weights) meet the output being written at the end;
    before that, its layers so far and two sets of activations. A --low-memory run writes the output itself in
    the journal's folder: only the activations come on top. Activations of a model whose config cannot be read
    yet (a hub model not downloaded) are left out."""
    per_set = _activation_bytes(model_name, recipe, device, dtype)
    needs = registry.get(recipe.method).needs_for(recipe.method_options())
    dense = recipe.sequential.inputs == "compressed" and \
        ("cross" in needs or (recipe.refine.epochs > 0 and recipe.refine.target == "dense"))
    activations = 2 * per_set * (2 if dense else 1)
    return activations if low_memory else max(source_bytes or 0, activations)


def _activation_bytes(model_name: str, recipe, device: str, dtype: str) -> int:
    config = Path(model_name).expanduser() / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_name, "config.json")
        except Exception:  # noqa: BLE001 (not a hub id either: the pre-flight has said so already)
            return 0
        if not isinstance(cached, str):
            return 0
        config = Path(cached)
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return 0
    data = data.get("text_config", data) if "hidden_size" not in data else data
    hidden = data.get("hidden_size") or data.get("n_embd") or data.get("d_model") or 0
    stored = str(data.get("torch_dtype") or data.get("dtype") or "float32")
    half = dtype in ("bfloat16", "float16") or (dtype == "auto" and not str(device).startswith("cpu")
                                                 and stored in ("bfloat16", "float16"))
    return recipe.calibration.nsamples * recipe.calibration.seqlen * int(hidden) * (2 if half else 4)
