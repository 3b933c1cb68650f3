"""Pure helpers of scripts/bench_peers.py: bytes on disk, the results table and the plot, each peer's venv.

Byte counts come from the files a tool wrote, never from its own claims: a safetensors file's header lists every
tensor's byte range, so the targeted linears' bytes are the sum of their ranges, and a checkpoint's bytes are its
weight files' sizes.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")
# A decoder layer's tensors are its linears' and its norms'; lrc's targets ("*") are every linear inside the layers.
_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> stored bytes, from the header of one .safetensors file (no tensor is read)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: info["data_offsets"][1] - info["data_offsets"][0]
            for name, info in header.items() if name != "__metadata__"}


def is_target(name: str) -> bool:
    """Whether a stored tensor belongs to a decoder layer's linear (weight, packed codes, scales, zeros, bias)."""
    return bool(_LAYER.search(name)) and "norm" not in name


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of every weight file in `folder` (configs, tokenizers and recipes are not weights)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def target_bytes(folder: Path) -> int | None:
    """Bytes of the targeted linears' tensors over the folder's safetensors files; None when it has none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    return sum(n for p in files for name, n in safetensors_sizes(p).items() if is_target(name))


def rest_bytes(folder: Path) -> int:
    """Bytes of every stored tensor that is not a targeted linear's (embeddings, norms, an untied head): what lrc
    keeps as it is. Tensor bytes, not file sizes: file headers are not weights, and lrc's budget counts tensors."""
    return sum(n for p in sorted(folder.glob("*.safetensors")) for name, n in safetensors_sizes(p).items()
               if not is_target(name))


COLUMNS = ("tool", "version", "setting", "targeted linears", "checkpoint", "perplexity", "Δ over dense", "seconds")


def mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} MB"


def format_table(rows: list[dict], dense_ppl: float) -> str:
    """Markdown table of the rows; a failed row keeps its place and says why in the perplexity column."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.get("error"):
            score, delta = f"not run: {r['error']}", "—"
        else:
            score, delta = f"{r['ppl']:.3f}", f"{r['ppl'] - dense_ppl:+.3f}"
        seconds = "—" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        cells = [r["tool"], r.get("version", "—"), r["setting"], mb(r.get("target_bytes")),
                 mb(r.get("checkpoint_bytes")), score, delta, seconds]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path:
    """Left: perplexity against the targeted linears' bytes, one marker per tool. Right: each row's wall seconds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # dense is the dashed line: as a point, its 8x larger bytes would squeeze every compressed row into one corner
    rows = [r for r in data["rows"] if not r.get("error") and r.get("target_bytes") and r["tool"] != "dense"]
    fig = Figure(figsize=(13, 5))
    FigureCanvasAgg(fig)
    quality, speed = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    markers = dict(zip(sorted({r["tool"] for r in rows}), "osD^vP*X"))
    for tool, marker in markers.items():
        mine = sorted((r for r in rows if r["tool"] == tool), key=lambda r: r["target_bytes"])
        quality.scatter([r["target_bytes"] / 1e6 for r in mine], [r["ppl"] for r in mine], marker=marker, label=tool)
        for r in mine:
            quality.annotate(r.get("short", ""), (r["target_bytes"] / 1e6, r["ppl"]), fontsize=6,
                             xytext=(3, 3), textcoords="offset points")
    quality.axhline(data["dense_ppl"], color="grey", linestyle="--", linewidth=1, label="dense")
    quality.set_yscale("log")
    quality.set_xlabel("stored bytes of the targeted linears (MB, read from the files)")
    quality.set_ylabel("perplexity (log), bundled test split")
    quality.set_title(f"{Path(data['model']).name}: perplexity vs bytes")
    quality.grid(True, alpha=0.3)
    quality.legend(fontsize=8)
    labels = [f"{r['tool']} {r.get('short', '')}" for r in rows]
    speed.barh(range(len(rows)), [r.get("seconds") or 0 for r in rows], color="tab:blue")
    speed.set_yticks(range(len(rows)), labels, fontsize=7)
    speed.invert_yaxis()
    speed.set_xlabel("wall seconds of the compression (1 thread, shared machine)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def ensure_venv(folder: Path, requirements: list[str], log: Path, timeout: float) -> Path:
    """The python of a virtual environment at `folder` holding `requirements`, created with pip on first use.

    torch is pinned to lrc's own version first so that pip resolves the peer against the CPU wheel already at hand
    instead of pulling a CUDA build. A venv whose last install did not finish is redone (the marker file)."""
    python = folder / "bin" / "python"
    marker = folder / "bench-peers-ready"
    wanted = " ".join(requirements)
    if marker.is_file() and marker.read_text() == wanted:
        return python
    import torch

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, stdout=out, stderr=out,
                           timeout=timeout)
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        subprocess.run([str(python), "-m", "pip", "install", "--no-input", "--quiet", torch_pin, *requirements],
                       check=True, stdout=out, stderr=out, timeout=timeout)
    marker.write_text(wanted)
    return python


def last_error(text: str) -> str:
    """The one line that says why a subprocess failed: its last exception line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]
