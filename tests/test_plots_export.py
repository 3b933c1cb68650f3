"""Plots (`compressor.plots`), `lrc report OUT` and `lrc export OUT --dense -o DENSE`.

The export round trip loads the dense checkpoint in a fresh interpreter that never imports `compressor`, and
compares its logits with the lrc model's. Measured on the tiny fp32 Qwen2 below: max |Δlogit| ≈ 2e-7 (B·A is
formed in fp64 then rounded to fp32 once, instead of two fp32 matmuls); the bound is 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import one_error_line, run
from tests.helpers import word_tokenizer as _tokenizer

PPL = {"before": 12.5, "after": 13.25, "data": "bundled test.txt", "seqlen": 32, "windows": 2, "tokens_scored": 62}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
IDS = [[1, 5, 9, 200, 17, 3, 250, 42, 7, 8, 99, 100], [0, 255, 128, 64, 32, 16, 8, 4, 2, 1, 77, 66]]


@pytest.fixture(scope="module")
def lrc_out(tmp_path_factory, tiny_model) -> Path:
    """A real lrc output: tiny fp32 Qwen2 (q/k/v biases), svd-llm-20, a word-level tokenizer, a perplexity block."""
    from compressor.api import compress
    from compressor.recipe import load_recipe
    from compressor.report.summary import build_report, count_parameters, render_markdown, state_bytes

    out = tmp_path_factory.mktemp("plots") / "out"
    model = tiny_model("qwen2")  # q/k/v carry non-zero biases: the export must keep them
    before, bytes_before = count_parameters(model), state_bytes(model)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    result = compress(model, load_recipe("svd-llm-20"), batches=ids)
    report = build_report(result, model_source="Qwen/Qwen2.5-0.5B", params_before=before,
                          params_after=count_parameters(model), bytes_before=bytes_before,
                          bytes_after=state_bytes(model))
    report["perplexity"] = dict(PPL)
    result.save(out, tokenizer=_tokenizer(), report=report, report_md=render_markdown)
    return out


# ---------------------------------------------------------------- plots and `lrc report`


def test_write_plots_without_perplexity(tmp_path, lrc_out):
    """(All four plots are drawn and checked in test_lrc_report_rerenders_with_images.)"""
    from compressor.report.plots import write_plots

    report = json.loads((lrc_out / "report.json").read_text())
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "perplexity.png").write_bytes(PNG_MAGIC)  # stale, from an earlier run
    written = write_plots({**report, "perplexity": None}, tmp_path / "plots")
    assert [p.name for p in written] == ["rank.png", "error.png", "params.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)
    for png in written:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, png


def test_render_markdown_without_plots_is_unchanged(lrc_out):
    from compressor.report.summary import render_markdown

    report = json.loads((lrc_out / "report.json").read_text())
    assert render_markdown(report) == (lrc_out / "report.md").read_text()
    assert "![" not in render_markdown(report)


def test_lrc_report_rerenders_with_images(tmp_path, lrc_out):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(lrc_out, out)
    before = (out / "report.md").read_text()
    result = run("report", out)
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    links = [line for line in md.splitlines() if line.startswith("![")]
    assert links == ["![Rank per module](plots/rank.png)",
                     "![Relative weight and output error per module](plots/error.png)",
                     "![Parameters and bytes per decoder layer, before and after](plots/params.png)",
                     "![Perplexity before and after](plots/perplexity.png)"]
    assert "4 plots" in result.stdout
    for name in ("rank", "error", "params", "perplexity"):
        data = (out / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    # Everything the report said before is still there; only the images were added.
    assert [line for line in md.splitlines() if not line.startswith("![") and line] == \
        [line for line in before.splitlines() if line]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def _module(layer: int, kind: str, params: tuple[int, int], nbytes: tuple[int, int], rank: int) -> dict:
    return {"name": f"model.layers.{layer}.{kind}", "compressed": True, "spec": {"kind": "quant", "rank": rank},
            "params_before": params[0], "params_after": params[1], "bytes_before": nbytes[0], "bytes_after": nbytes[1]}


def test_params_plot_shows_growth_and_bytes_with_the_legend_off_the_bars(tmp_path):
    """EoRA: a 4-bit base plus a residual has MORE parameters than the dense layer and far fewer bytes."""
    from compressor.report.plots import params_figure, plot_rank, rank_title

    modules = [_module(i, k, (1_000_000, 1_300_000), (2_000_000, 700_000), 64) for i in range(3)
               for k in ("self_attn.q_proj", "mlp.up_proj")]
    totals = {"target_params_before": 6_000_000, "target_params_after": 7_800_000,
              "target_bytes_before": 12_000_000, "target_bytes_after": 4_200_000}
    report = {"modules": modules, "totals": totals}
    fig = params_figure(report)
    params_ax, bytes_ax = fig.axes
    assert params_ax.get_ylim()[1] >= 2.6  # the taller "after" bars (2.6 M per layer) are inside the axes
    assert bytes_ax.get_ylim()[1] >= 4_000_000 / 2**20 and "bytes" in bytes_ax.get_ylabel()
    assert "7,800,000" in params_ax.get_title() and "4,200,000" in bytes_ax.get_title()
    for ax in fig.axes:  # legends anchored right of the axes, never over a bar
        fig.canvas.draw()
        legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert legend.x0 >= box.x1, (legend, box)
    assert plot_rank(report, tmp_path / "rank.png")
    assert "64 for every compressed module" in rank_title(modules)  # a fixed rank's flat line says so
    modules[0]["spec"]["rank"] = 32
    assert rank_title(modules) == "Rank per module (compressed modules)"


def test_lrc_report_errors(tmp_path):
    one_error_line(run("report", tmp_path / "absent"), "not a directory")
    one_error_line(run("report", tmp_path), "no report.json")
    (tmp_path / "report.json").write_text("{not json")
    one_error_line(run("report", tmp_path), "cannot read")
    (tmp_path / "report.json").write_text(json.dumps({"model": "m"}))
    one_error_line(run("report", tmp_path), "is not an lrc report")


# ---------------------------------------------------------------- `lrc export --dense`


LOAD_WITHOUT_LRC = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
assert not any(name == "compressor" or name.startswith("compressor.") for name in sys.modules)
assert all(type(m).__name__ != "LowRankLinear" for m in model.modules())
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
torch.save(logits, sys.argv[3])
print(type(model).__name__, str(model.dtype), type(tok).__name__)
"""


def test_export_dense_round_trip(tmp_path, lrc_out):
    from compressor.io.checkpoint import load_compressed

    dense = tmp_path / "dense"
    result = run("export", lrc_out, "--dense", "-o", dense)
    assert result.exit_code == 0, result.output
    config = json.loads((dense / "config.json").read_text())
    assert "quantization_config" not in config
    assert (dense / "tokenizer.json").read_bytes() == (lrc_out / "tokenizer.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LRC, str(dense), json.dumps(IDS),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["Qwen2ForCausalLM", "torch.float32"], proc.stdout
    dense_logits = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        lrc_logits = load_compressed(lrc_out)(torch.tensor(IDS)).logits
    diff = (dense_logits - lrc_logits).abs().max().item()
    print(f"max |dense - lrc| logits: {diff:.3g}")
    assert diff < 1e-5, diff
    # Same parameter names as a dense model of the architecture: a plain nn.Linear in every compressed spot.
    from safetensors import safe_open

    with safe_open(dense / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.layers.0.self_attn.q_proj.bias" in keys
    assert not any(".A." in k or ".B." in k for k in keys)


def test_export_errors(tmp_path, lrc_out):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "keep.txt").write_text("x")
    one_error_line(run("export", lrc_out, "--dense", "-o", dense), "output directory exists")
    one_error_line(run("export", lrc_out, "--dense", "-o", dense, "--overwrite"), "refusing to overwrite")
    one_error_line(run("export", lrc_out, "-o", tmp_path / "d2"), "pass --dense")
    one_error_line(run("export", tmp_path / "absent", "--dense", "-o", tmp_path / "d3"), "not a directory")
    one_error_line(run("export", dense, "--dense", "-o", tmp_path / "d4"), "no config.json")
    one_error_line(run("export", lrc_out, "--dense", "-o", lrc_out, "--overwrite"), "source checkpoint itself")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
    assert (dense / "keep.txt").read_text() == "x"
