"""README's generated blocks: the CLI reference is `--help` exactly, and the results renderer's markdown."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_in_readme_matches_help(update_readme):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert update_readme.read_block(readme, "cli-reference") == update_readme.cli_reference(), (
        "README.md's CLI reference differs from --help: run .venv/bin/python scripts/update_readme.py")


def test_cli_reference_covers_every_command(update_readme):
    text = update_readme.cli_reference()
    for path in ("lrc", "lrc compress", "lrc eval", "lrc demo", "lrc upload", "lrc report", "lrc export",
                 "lrc recipes", "lrc recipes list", "lrc recipes show"):
        assert f"#### `{path}`\n\n```\nUsage: {path} " in text


SAMPLE = {
    "model": "models/lrc-demo-llama",
    "date": "2026-01-02",
    "eval": {"data": "bundled test split", "windows": 10, "seqlen": 256},
    "calibration": {"nsamples": 64, "seqlen": 256, "source": "bundled train split"},
    "platform": {"machine": "x86_64", "torch": "2.13.0"},
    "rows": [
        {"label": "dense", "ppl": 35.0},
        {"label": "svd 20%", "recipe": "svd-20", "overrides": ["param_ratio=0.8"], "ppl": 36.25, "kept": 0.796875,
         "seconds": 12.0},
        {"label": "rtn 4-bit", "recipe": "rtn-4bit", "overrides": [], "ppl": 34.9, "kept": 1.015625,
         "seconds": 3.0},
    ],
}


def test_results_renderer_rows(update_readme):
    lines = update_readme.render_results(SAMPLE).splitlines()
    start = lines.index("| method / budget | target params kept | PPL | Δ vs dense |")
    assert lines[start + 1 : start + 5] == [
        "|---|---:|---:|---:|",
        "| dense | 100% | 35.000 |  |",
        "| svd 20% | 79.7% | 36.250 | +1.250 |",
        "| rtn 4-bit | 101.6% | 34.900 | -0.100 |",
    ]
    assert lines[start + 6].startswith(
        "models/lrc-demo-llama; perplexity on bundled test split (10 windows × 256 tokens); "
        "calibration 64×256 tokens (bundled train split); x86_64, torch 2.13.0; 2026-01-02.")


def test_results_without_setup_fields_say_so(update_readme):
    old = {key: SAMPLE[key] for key in ("model", "date", "rows")}  # what bench_quality wrote before
    assert "not recorded" in update_readme.render_results(old)


def test_blocks_are_replaced_in_place_and_markers_required(update_readme, tmp_path):
    text = "intro\n<!-- BEGIN results -->\nold\n<!-- END results -->\ntail\n"
    new = update_readme.replace_block(text, "results", "new body")
    assert new == "intro\n<!-- BEGIN results -->\nnew body\n<!-- END results -->\ntail\n"
    assert update_readme.read_block(new, "results") == "new body"
    assert update_readme.replace_block(new, "results", "new body") == new
    with pytest.raises(SystemExit):
        update_readme.replace_block("no markers\n", "results", "x")


def test_check_mode_and_missing_json(update_readme, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- BEGIN results -->\nkept\n<!-- END results -->\n"
                      "<!-- BEGIN cli-reference -->\nstale\n<!-- END cli-reference -->\n", encoding="utf-8")
    assert update_readme.main(["--check", "--readme", str(readme)]) == 1
    assert "cli-reference is out of date" in capsys.readouterr().out
    assert update_readme.main(["--readme", str(readme), "--json", str(tmp_path / "missing.json")]) == 0
    assert "results block left unchanged" in capsys.readouterr().out
    assert "<!-- BEGIN results -->\nkept\n<!-- END results -->" in readme.read_text(encoding="utf-8")
    assert update_readme.main(["--check", "--readme", str(readme)]) == 0
