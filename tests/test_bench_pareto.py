"""scripts/bench_pareto.py on a tiny in-process Llama: each point's size and parameter ratios, and the plot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_pareto import measure, plot  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class _PPL:
    ppl = 1.0


def test_points_record_bytes_and_parameters_and_plot(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, dtype=torch.bfloat16)
    model = LlamaForCausalLM(config).eval()
    from tests.helpers import word_tokenizer

    calib = ["calibration.nsamples=2", "calibration.seqlen=16", "sequential.inputs=dense"]
    rows = [{"label": "dense", "ppl": 1.5, "size": 1.0}]
    for family, recipe, overrides in (("svd-llm", "svd-llm-20", ["size_ratio=0.6"]),
                                      ("svd-llm+int8", "svd-llm-int8-40", [])):
        row = measure(model, word_tokenizer(), recipe, overrides, calib, lambda m: _PPL(), torch.bfloat16)
        rows.append({**row, "family": family, "label": f"{family} {row['size']:.2f}"})
    assert 0.55 < rows[1]["size"] <= 0.6 and rows[1]["kept"] == pytest.approx(rows[1]["size"], abs=1e-9)
    assert 0.55 < rows[2]["size"] <= 0.6 < rows[2]["kept"]  # 8-bit factors: more parameters in the same bytes
    png = plot({"model": "tiny", "rows": rows}, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
