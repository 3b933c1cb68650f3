"""The package's architecture, as specifications: sub-packages by concern with a stated import rule, and one
`lrc compress` that reads its recipe once and selects its targets once (compressor/pipeline/run.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import compressor.api  # noqa: F401  (every module that may select targets is loaded before they are counted)
import compressor.pipeline.targets
import compressor.recipe
from compressor.cli import app
from compressor.resources import demo_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = Path(compressor.recipe.__file__).resolve().parent
SUBPACKAGES = ("nn", "budget", "methods", "report", "io", "pipeline")
# What each sub-package must never import (its __init__ docstring says so too).
FORBIDDEN = {
    "nn": {"pipeline", "budget", "methods", "io", "report", "api", "cli", "demo", "recipe"},
    "budget": {"nn", "pipeline", "methods", "io", "report", "api", "cli", "demo"},
    "methods": {"pipeline", "io", "report", "api", "cli", "demo"},
    "report": {"pipeline", "methods", "budget", "io", "api", "cli", "demo"},
    "io": {"pipeline", "methods", "budget", "api", "cli", "demo"},
    "pipeline": {"api", "cli", "demo"},
}


def _imported_packages(path: Path) -> set[str]:
    """First component under `compressor.` of every module `path` imports (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "compressor":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("compressor.")}
    return found


def test_top_level_is_small_and_every_subpackage_says_what_it_may_import():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 14, top
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import" in doc, f"compressor/{name}/__init__.py must open with its import rule"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_lower_layers_never_import_higher_ones(package):
    for path in sorted((PACKAGE / package).glob("*.py")):
        bad = _imported_packages(path) & FORBIDDEN[package]
        assert not bad, f"compressor/{package}/{path.name} imports {sorted(bad)}"


def test_loading_a_checkpoint_does_not_import_the_pipeline():
    code = ("import sys, compressor, compressor.modules, compressor.nn.hf_integration;"
            "print(sorted(m for m in sys.modules if m.startswith(('compressor.pipeline', 'compressor.methods',"
            "'compressor.budget', 'compressor.api', 'compressor.io'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_imports_keep_working():
    import compressor
    from compressor import compress, evaluate, load_compressed, load_model  # noqa: F401
    from compressor.modules import LowRankLinear, QuantLinear, prepare_inference  # noqa: F401

    assert compressor.compress is compress and callable(compressor.load_model)
    with pytest.raises(AttributeError):
        compressor.no_such_name  # noqa: B018
    main = subprocess.run([sys.executable, "-m", "compressor", "--version"], capture_output=True, text=True)
    assert main.returncode == 0 and "version" in main.stdout


# ---------------------------------------------------------------- one run: the recipe read once, targets once


@pytest.fixture
def counted(monkeypatch):
    """Counts of recipe files read (by name or path) and of target selections during the block."""
    counts = {"recipe_reads": 0, "target_selections": 0}
    read, select = compressor.recipe._read, compressor.pipeline.targets.select_targets

    def counting_read(*args, **kwargs):
        counts["recipe_reads"] += 1
        return read(*args, **kwargs)

    def counting_select(*args, **kwargs):
        counts["target_selections"] += 1
        return select(*args, **kwargs)

    monkeypatch.setattr(compressor.recipe, "_read", counting_read)
    for module in list(sys.modules.values()):  # every module that imported select_targets by name
        if getattr(module, "select_targets", None) is select:
            monkeypatch.setattr(module, "select_targets", counting_select)
    return counts


@pytest.mark.parametrize("args", [
    ("-r", "svd-llm-20"),
    ("-r", "svd-llm-20", "--low-memory"),
    ("-r", "svd-llm-20", "--set", "allocation=energy", "--set", "allocation_options.energy=0.9"),
    ("-r", "svd-llm-20", "--target-size", "9MB", "--set", "calibration.seed=3"),
], ids=["memory", "low-memory", "energy-allocation", "target-bytes"])
def test_compress_reads_the_recipe_once_and_selects_targets_once(counted, tmp_path, args):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(demo_model_dir()), *args, "-o", str(out), "--nsamples", "4",
                                      "--seqlen", "32", "--no-plots"], prog_name="lrc")
    assert result.exit_code == 0, result.output
    assert counted == {"recipe_reads": 1, "target_selections": 1}
    saved = compressor.recipe.Recipe(**__import__("yaml").safe_load((out / "recipe.yaml").read_text()))
    if "--target-size" in args:  # the byte budget's size_ratio, and the user's --set kept beside it
        assert saved.options.get("size_ratio") is not None and saved.calibration.seed == 3
        assert json.loads((out / "report.json").read_text())["totals"]["weight_bytes_after"] <= 9_000_000
