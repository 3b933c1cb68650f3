"""The pure helpers of scripts/bench_peers.py: bytes read from safetensors headers, the results table. No peer
library is installed or run here (the benchmark itself does that, in its own virtual environments)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from peers_lib import (checkpoint_bytes, format_table, is_target, last_error, rest_bytes, safetensors_sizes,  # noqa: E402
                       target_bytes)


def test_safetensors_sizes_are_the_stored_byte_ranges(tmp_path):
    tensors = {"a": torch.zeros(3, 5, dtype=torch.float32), "b": torch.zeros(7, dtype=torch.int8),
               "c": torch.zeros(2, 2, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    assert safetensors_sizes(tmp_path / "m.safetensors") == {"a": 60, "b": 7, "c": 8}


@pytest.mark.parametrize("name, target", [
    ("model.layers.0.self_attn.q_proj.weight", True),
    ("model.layers.12.mlp.down_proj.weight_packed", True),
    ("model.layers.3.mlp.up_proj.scales", True),
    ("model.layers.3.input_layernorm.weight", False),
    ("model.layers.3.post_attention_layernorm.weight", False),
    ("model.embed_tokens.weight", False),
    ("model.norm.weight", False),
    ("lm_head.weight", False),
])
def test_targets_are_the_decoder_layers_tensors_but_norms(name, target):
    assert is_target(name) is target


def test_target_and_checkpoint_bytes_of_a_folder(tmp_path):
    save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 8, dtype=torch.int32),
               "model.layers.0.mlp.up_proj.scales": torch.zeros(1, 8, dtype=torch.float16),
               "model.layers.0.input_layernorm.weight": torch.zeros(8),
               "model.embed_tokens.weight": torch.zeros(10, 8)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert target_bytes(tmp_path) == 4 * 8 * 4 + 8 * 2
    assert rest_bytes(tmp_path) == 8 * 4 + 10 * 8 * 4  # tensors only: the header is no weight
    assert checkpoint_bytes(tmp_path) == (tmp_path / "model.safetensors").stat().st_size  # config.json is no weight
    (tmp_path / "pickled").mkdir()
    assert target_bytes(tmp_path / "pickled") is None  # no safetensors: the worker counts from its own file


def test_table_has_a_row_per_result_and_says_why_a_row_failed():
    rows = [{"tool": "hqq", "version": "0.2.8", "setting": "w4 g64", "target_bytes": 59_719_680,
             "checkpoint_bytes": 120_000_000, "ppl": 21.5, "seconds": 12.2},
            {"tool": "llmcompressor", "version": "0.14", "setting": "w4 g128", "error": "ValueError: 576 % 128"}]
    table = format_table(rows, dense_ppl=20.0).splitlines()
    assert len(table) == 4
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells == ["hqq", "0.2.8", "w4 g64", "59.72 MB", "120.00 MB", "21.500", "+1.500", "12"]
    assert "not run: ValueError: 576 % 128" in table[3]


def test_last_error_is_the_exception_line():
    log = "loading\nTraceback (most recent call last):\n  File x\nValueError: columns not divisible\n\n"
    assert last_error(log) == "ValueError: columns not divisible"
    assert last_error("killed by signal 9\n") == "killed by signal 9"
