"""Where the bundled recipes, calibration text and demo model live.

In a source checkout they sit at the top of the repository; in an installed wheel under compressor/_data/.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bundled resource folder {name!r} is missing from this installation")


def recipes_dir() -> Path:
    return resource_dir("recipes")


def calibration_file(split: str) -> Path:
    """Bundled text split: 'train' (calibration default), 'valid', 'test' (evaluation default)."""
    return resource_dir("calibration") / f"{split}.txt"


DEMO_MODEL_NAME = "lrc-demo-llama"


def demo_model_dir() -> Path:
    """Where the shipped demo model lives (the caller checks that it is there)."""
    for candidate in (_PKG / "_data" / "models" / DEMO_MODEL_NAME, _PKG.parent / "models" / DEMO_MODEL_NAME):
        if candidate.is_dir():
            return candidate
    return _PKG.parent / "models" / DEMO_MODEL_NAME
