"""What a checkpoint is, cheaply: a digest of its config, its safetensors headers and sampled bytes of every tensor,
plus the hub commit it came from. A resumed run compares it with the interrupted run's (compressor/pipeline/journal.py).

    checkpoint_fingerprint("models/lrc-demo-llama")   # {"model": "3f0c...", "model revision": "none"}

Reading every byte of a 140 GB checkpoint would take minutes, so each tensor contributes SAMPLES chunks of CHUNK
bytes spread over its data (all of it when smaller): a fine-tune, a re-export or a different model changes
essentially every chunk, and the whole fingerprint reads a few KB per tensor through the offsets in the header. A
change confined to bytes between the chunks (one edited element) can go unseen. Files without a header (`.bin`,
`.gguf`) are sampled the same way over the whole file.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

SAMPLES = 4
CHUNK = 1024
_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt")


def checkpoint_fingerprint(name_or_path: str) -> dict[str, str]:
    """`model`: the content digest; `model revision`: the hub commit (a hub id, or a path inside the hub cache's
    `snapshots/<commit>/`), "none" for a plain local directory. A hub id whose files are not cached is known by
    its id only."""
    folder = Path(name_or_path).expanduser()
    revision = "none"
    if not folder.is_dir():
        cached = _cached_snapshot(name_or_path)
        if cached is None:
            return {"model": f"hub:{name_or_path}", "model revision": "unknown"}
        folder = cached
    resolved = folder.resolve()
    if resolved.parent.name == "snapshots" and _SNAPSHOT.match(resolved.name):
        revision = resolved.name
    return {"model": _folder_digest(folder), "model revision": revision}


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 (not a valid id, no hub library: no snapshot to name)
        return None
    return Path(config).parent if isinstance(config, str) else None


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.name == "config.json" or path.name.endswith(".index.json"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.name.endswith(_WEIGHTS):
            digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode())
            with path.open("rb") as f:
                if path.suffix == ".safetensors":
                    _safetensors_sample(f, digest)
                else:
                    _sample(f, 0, path.stat().st_size, digest, samples=64)
    return digest.hexdigest()[:16]


def _safetensors_sample(f, digest) -> None:
    raw = f.read(8)
    if len(raw) < 8:
        return
    (size,) = struct.unpack("<Q", raw)
    header = f.read(min(size, 100 * 2**20))
    digest.update(header)
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # a corrupt file: the loader says so; its header bytes are in the digest already
    base = 8 + size
    for name in sorted(k for k in entries if k != "__metadata__"):
        begin, end = entries[name].get("data_offsets", (0, 0))
        _sample(f, base + begin, base + end, digest)


def _sample(f, begin: int, end: int, digest, samples: int = SAMPLES) -> None:
    """SAMPLES chunks spread evenly over bytes [begin, end), first and last included; all of them when few."""
    length = end - begin
    if length <= samples * CHUNK:
        f.seek(begin)
        digest.update(f.read(length))
        return
    step = (length - CHUNK) / (samples - 1)
    for i in range(samples):
        f.seek(begin + int(i * step))
        digest.update(f.read(CHUNK))
