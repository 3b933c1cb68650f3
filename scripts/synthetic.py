"""Random-weight Llama checkpoints of real model shapes, written layer by layer (for speed and memory benchmarks).

    from synthetic import SHAPES, build_checkpoint
    folder = build_checkpoint(Path(".cache/synthetic-7b"), SHAPES["7b"])

Weights: N(0, 0.02²) (norms 1), stored bf16, one safetensors shard per decoder layer plus one for the rest, with
an index; the bundled demo tokenizer is copied (ids < 1024 are valid for any of these vocabularies). Building
never holds more than one layer, so a 7B-shaped checkpoint (13.5 GB) can be made on a machine with less RAM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_COMMON = dict(max_position_embeddings=2048, tie_word_embeddings=False)
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, **_COMMON),  # Llama-2-7B
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, **_COMMON),  # TinyLlama-1.1B
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, **_COMMON),  # for checking the scripts themselves
}


def build_checkpoint(folder: Path, shape: dict, seed: int = 0) -> Path:
    """Write the checkpoint once (an existing complete one is reused); returns `folder`."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**shape, dtype="bfloat16")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups.values()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.ones(shapes[name]) if "norm" in name else torch.randn(shapes[name], generator=generator) * 0.02
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = shard
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
    total = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "lrc-demo-llama" / file, tmp / file)
    tmp.rename(folder)
    return folder
