"""Resumable runs: a journal of finished decoder layers, kept next to the output while it is being made.

    journal = Journal.open(Path("out"), identity, resume=True)   # `lrc compress ... -o out --resume`
    api.compress(model, recipe, batches=batches, journal=journal)

Layout of `.OUT.partial/` (beside OUT, same filesystem):
  journal.json              {"identity": ..., "done": k, "stream": "stream-0000k.safetensors", "state": {...}}
  stream-0000k.safetensors  the activations layer k needs (the compressed stream, and the dense one when the run
                            keeps it), one tensor per calibration batch, exactly as the runner held them
  layer-0000i.safetensors   layer i as compressed (in-memory runs; a --low-memory run writes its output shards here
                            instead, and they are the output's own)
`done` only moves once the files it names are complete (each is written under a temporary name and renamed, the
journal last), so a run killed at any instant (SIGKILL included) resumes from the last finished layer; since the
saved activations and layers are the ones the interrupted run held, the resumed run's tensors are identical to
an uninterrupted run's. A journal whose identity (recipe, model, calibration data, device, dtype, mode) differs
from the new run's is refused, never mixed.
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

from compressor.errors import UserError, out_of_space

JOURNAL_NAME = "journal.json"
FORMAT = 1
# Fault injection for the crash tests (tests/test_resume_cli.py): LRC_FAULT=<point> kills this process with SIGKILL
# when the run reaches that point ("before-layers", "after-layer:N", "final-write"); LRC_FAULT=SIGINT@<point> sends
# it a SIGINT there instead (a Ctrl-C). Unset in normal use.
FAULT_ENV = "LRC_FAULT"


def fault(point: str) -> None:
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted == f"SIGINT@{point}":
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


def fingerprint_model(name_or_path: str) -> str:
    """A local checkpoint: its config and the names and sizes of its weight files (reading every byte of a 140 GB
    model would take minutes); a hub id: the id itself."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return f"hub:{name_or_path}"
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.name.endswith(".index.json"):
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".gguf"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


@dataclass
class Resumed:
    """Where a journaled run stands: `done` layers finished, the activations layer `done` needs, and the caller's
    JSON state (module reports, refinement) as it was after that layer."""

    done: int
    hidden: list[torch.Tensor]
    dense_hidden: list[torch.Tensor] | None
    state: dict


class Journal:
    def __init__(self, folder: Path, identity: dict):
        self.folder, self.identity = Path(folder), identity
        self._entry: dict | None = None

    @classmethod
    def open(cls, out, identity: dict, *, resume: bool) -> "Journal":
        """The journal of a run writing `out`: a fresh one, or (with `resume`) the interrupted run's. A leftover
        partial run without `resume` is refused with the hint, as is resuming a different run."""
        folder = partial_dir(out)
        refuse_leftover(out, resume)
        for stale in Path(out).parent.glob(f".{Path(out).name}.tmp-*"):  # a final write killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():
            entry = _read_entry(folder)
            if entry is not None and entry["done"] > 0:
                _check_identity(entry.get("identity", {}), identity, folder)
                journal = cls(folder, identity)
                journal._entry = entry
                return journal
            shutil.rmtree(folder)  # killed before its first layer finished: nothing worth keeping
        folder.mkdir(parents=True)
        journal = cls(folder, identity)
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
        tensors = load_file(self.folder / entry["stream"])
        count = entry["batches"]
        hidden = [tensors[f"hidden.{b}"] for b in range(count)]
        dense = [tensors[f"dense.{b}"] for b in range(count)] if "dense.0" in tensors else None
        return Resumed(entry["done"], hidden, dense, entry["state"])

    def layer_file(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    def layer_tensors(self, index: int, prefix: str) -> dict[str, torch.Tensor]:
        """Layer `index` as the interrupted run left it, names relative to the layer (`prefix` removed)."""
        return {k.removeprefix(prefix): v for k, v in load_file(self.layer_file(index)).items()}

    def record(self, done: int, hidden: list[torch.Tensor], dense_hidden: list[torch.Tensor] | None, state: dict,
               layer_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Layers 0..done-1 are finished: keep `layer_tensors` (layer done-1, when the output does not already
        hold it), the activations for layer `done`, and the caller's `state`; then move the journal on."""
        if layer_tensors is not None:
            _atomic_save(layer_tensors, self.layer_file(done - 1))
        stream = {f"hidden.{b}": h for b, h in enumerate(hidden)}
        if dense_hidden is not None:
            stream.update({f"dense.{b}": h for b, h in enumerate(dense_hidden)})
        name = f"stream-{done:05d}.safetensors"
        _atomic_save(stream, self.folder / name)
        previous = (self._entry or {}).get("stream")
        self._write_entry({"format": FORMAT, "identity": self.identity, "done": done, "stream": name,
                           "batches": len(hidden), "state": state})
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

    def _write_entry(self, entry: dict) -> None:
        tmp = self.folder / (JOURNAL_NAME + ".tmp")
        try:
            tmp.write_text(json.dumps(entry, indent=1), encoding="utf-8")
        except OSError as exc:
            raise out_of_space(exc, self.folder) or exc from None
        os.replace(tmp, self.folder / JOURNAL_NAME)
        self._entry = entry


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    except Exception as exc:  # noqa: BLE001 (safetensors' own error type carries the OS error)
        raise out_of_space(exc, path.parent) or exc from None
    os.replace(tmp, path)


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
    differ = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if differ:
        raise UserError(f"cannot resume: the {', '.join(differ)} differ from the interrupted run's in {folder} "
                        "(rerun with the same settings, or delete that directory to start again)")


def run_identity(recipe, model_name: str, batches: torch.Tensor, *, device: str, dtype: str, low_memory: bool) -> dict:
    """What must match for a journal to be resumed: everything that decides the output's tensors."""
    return {"recipe": hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:16],
            "model": fingerprint_model(model_name), "calibration data": fingerprint_tensor(batches),
            "device": str(device), "dtype": dtype, "mode": "low-memory" if low_memory else "in-memory"}
