"""Checks made before any model is loaded: a run that is going to fail must fail in seconds, not after an hour of
compression.

    check_model_source("models/lrc-demo-lama")     # UserError: no such local directory (did you mean ...?)
    check_output("out/", overwrite=False, expected_bytes=source_weight_bytes("models/lrc-demo-llama"))

- the model: an argument that looks like a path (it exists, starts with `.`, `/` or `~`, has no `/` or more than one,
  or its first component is a local directory, like `models/x`) must be a local checkpoint directory; only an
  `org/name` id goes to the hub, and that is asked once (no retries) so a typo or a missing network is one line;
- the output: the rules of the writer (compressor.io: must not exist, `--overwrite` replaces only a checkpoint),
  a real attempt to create and remove the writer's hidden temporary directory next to it, and the free space there
  against the expected size of what will be written: the output, plus for `compress` its resume journal (the
  finished layers and the activations, compressor/pipeline/journal.py `journal_bytes`), which sits beside it.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from pathlib import Path

from compressor.errors import UserError
from compressor.io.checkpoint import CONFIG_NAME, check_destination

_SPACE_MARGIN = 1.05  # report.json, plots, tokenizer files and filesystem slack on top of the weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


# --------------------------------------------------------------------------------------------- the model argument

def looks_local(name: str) -> bool:
    """True when `name` can only mean a local path (a hub id is `org/name`)."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return True
    parts = name.split("/")
    return len(parts) != 2 or Path(parts[0]).is_dir()


def check_model_source(name: str) -> int | None:
    """UserError unless `name` is a local checkpoint directory or an `org/name` hub model that can be fetched.
    Returns the bytes of its weight files when known (None: a hub model whose listing gave no sizes)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path is not a directory: {name}")
        if not (path / CONFIG_NAME).is_file():
            raise UserError(f"not a model directory (no {CONFIG_NAME}): {name}")
        return source_weight_bytes(name)
    if looks_local(name):
        raise UserError(f"model directory not found: {name}{_suggestion(path)} (only an org/name id is looked up "
                        "on the hub)")
    return _check_hub_model(name)


def _suggestion(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        siblings = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.75)
    return f"; did you mean {parent / close[0]}?" if close else ""


def _check_hub_model(repo_id: str) -> int | None:
    """One request (no retry loop) for `org/name`, which also gives the weights' size: the download must fit in
    the hub cache. Offline, the local hub cache is asked instead."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(repo_id, CONFIG_NAME)
    except HFValidationError as exc:
        raise UserError(f"not a local directory nor a valid hub model id: {repo_id} ({_first_line(exc)})") from None
    if constants.HF_HUB_OFFLINE:
        if not isinstance(cached, str):
            raise UserError(f"model not found: {repo_id} is not a local directory, and the hub is off "
                            "(HF_HUB_OFFLINE) and its cache holds no copy")
        return None
    try:
        info = HfApi().model_info(repo_id, timeout=20, files_metadata=True)
    except GatedRepoError:
        raise UserError(f"hub model {repo_id} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"no hub model {repo_id} (and no such local directory); a private one needs HF_TOKEN") \
            from None
    except Exception as exc:  # noqa: BLE001 (network down, proxy, timeout: one line, unless a cached copy exists)
        if not isinstance(cached, str):
            raise UserError(f"cannot reach the hub for {repo_id} ({_first_line(exc)}), and no cached copy; "
                            "check the network or pass a local directory") from None
        return None
    files = [(f.rfilename, f.size or 0) for f in info.siblings or ()]
    size = sum(n for name, n in files if name.endswith(".safetensors")) or \
        sum(n for name, n in files if name.endswith(".bin")) or None
    if size and not isinstance(cached, str):  # first download: it must fit where the hub cache lives
        cache = _existing_ancestor(Path(constants.HF_HUB_CACHE))
        free = shutil.disk_usage(cache).free
        if free < size:
            raise UserError(f"not enough disk space to download {repo_id}: {_gib(size)} of weights, {_gib(free)} "
                            f"free in the hub cache {cache} (set HF_HOME to move it)")
    return size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def source_weight_bytes(name: str) -> int | None:
    """Bytes of a local checkpoint's weight files; None for a hub id (not known before downloading)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def export_bytes(src, *, dense: bool) -> int:
    """Expected size of an export of the lrc output `src`: its weights, scaled back to the dense size (from
    report.json's weight bytes before/after) for a dense export."""
    src = Path(src)
    size = source_weight_bytes(str(src)) or 0
    if dense:
        try:
            totals = json.loads((src / "report.json").read_text(encoding="utf-8"))["totals"]
            size = int(size * totals["weight_bytes_before"] / totals["weight_bytes_after"])
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            pass  # no usable report: the compressed size is still a lower bound
    return size


# --------------------------------------------------------------------------------------------- the output directory

def check_output(out, *, overwrite: bool, expected_bytes: int | None = None, destination_rules: bool = True,
                 source=None, journal_bytes: int = 0) -> None:
    """Everything about `out` that can fail after the work, checked before it. `destination_rules`: also apply the
    writer's exists/`--overwrite` rules (off for callers with their own, like the adapter export). `source`: the
    checkpoint being read, which `--overwrite` must never replace. `journal_bytes`: what a `compress` run's resume
    journal holds beside the output at its peak (compressor/pipeline/journal.py), reserved on top of it."""
    out = Path(out)
    source = Path(source).expanduser() if source is not None else None
    if source is not None and source.exists() and source.resolve() == out.resolve():
        raise UserError(f"the output is the source checkpoint itself: {out} (choose another output directory)")
    if destination_rules:
        check_destination(out, overwrite)
    parent = _existing_ancestor(out.parent)
    try:  # exactly what the writer will do first: a hidden temporary directory next to `out`
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.preflight-"))
    except OSError as exc:
        raise UserError(f"cannot write the output {out}: {parent} is not writable ({exc.strerror or exc})") from None
    if expected_bytes or journal_bytes:
        free = shutil.disk_usage(parent).free
        needed = int(((expected_bytes or 0) + journal_bytes) * _SPACE_MARGIN)
        what = f" (the output, and {_gib(journal_bytes)} of resume journal beside it)" if journal_bytes else ""
        if free < needed:
            raise UserError(f"not enough disk space for {out}: about {_gib(needed)} needed{what}, {_gib(free)} free "
                            f"on {parent}")


def _existing_ancestor(folder: Path) -> Path:
    """The nearest existing ancestor of `folder` (the writer creates the missing ones); UserError if it is a file."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write below {folder}: it is a file, not a directory")
    return folder


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
