"""README.md and docs/: README stays short and links every docs page, every relative link resolves, the generated
blocks (the CLI reference is `--help` exactly; the results renderer's markdown) live where scripts/update_readme.py
looks for them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.fixture(scope="module")
def update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- README and docs/


def _prose(text: str) -> str:
    """`text` without fenced code blocks and inline code spans (links and headings there are not links)."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(path: Path) -> list[str]:
    """Every link and image target of a markdown file, in order."""
    return re.findall(r"\]\(([^()\s]+)\)", _prose(path.read_text(encoding="utf-8")))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines (at most 300): move the details into docs/"


def test_readme_has_the_ci_test_command():
    command = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert command == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert command in README.read_text(encoding="utf-8")


def test_every_docs_page_is_linked_from_readme():
    assert DOCS, "docs/*.md is empty"
    linked = {(ROOT / link.split("#")[0]).resolve() for link in _links(README) if not re.match(r"\w+:", link)}
    missing = [str(page.relative_to(ROOT)) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"\w+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_anchor_slugs(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Speed and scale (CPU figures; GPU runs pending)\n## Real-LLM quality: SmolLM2-135M-Instruct\n"
                    "## `lrc compress MODEL -r RECIPE -o OUT`\n## Tests\n## Tests\n```\n# not a heading\n```\n")
    assert _anchors(page) == {"speed-and-scale-cpu-figures-gpu-runs-pending", "real-llm-quality-smollm2-135m-instruct",
                              "lrc-compress-model--r-recipe--o-out", "tests", "tests-1"}


# ---------------------------------------------------------------- generated blocks


def test_each_block_is_in_its_file_only(update_readme):
    for name, relative in update_readme.BLOCKS.items():
        holders = [p for p in [README, *DOCS] if f"<!-- BEGIN {name} -->" in p.read_text(encoding="utf-8")]
        assert holders == [ROOT / relative], (
            f"block {name} is in {holders}; scripts/update_readme.py expects it in {relative} only")


def test_cli_reference_matches_help(update_readme):
    text = update_readme.block_file("cli-reference").read_text(encoding="utf-8")
    assert update_readme.read_block(text, "cli-reference") == update_readme.cli_reference(), (
        "docs/cli.md's CLI reference differs from --help: run .venv/bin/python scripts/update_readme.py")


def test_cli_reference_covers_every_command(update_readme):
    text = update_readme.cli_reference()
    for path in ("lrc", "lrc compress", "lrc eval", "lrc demo", "lrc upload", "lrc report", "lrc export",
                 "lrc recipes", "lrc recipes list", "lrc recipes show"):
        assert f"## `{path}`\n\n```\nUsage: {path} " in text


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


def _tree(tmp_path: Path, update_readme) -> dict[str, Path]:
    """A tree with every block's file under tmp_path: results holding 'kept', cli-reference 'stale'."""
    files = {}
    for name, relative in update_readme.BLOCKS.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "kept" if name == "results" else "stale"
        path.write_text(f"# page\n<!-- BEGIN {name} -->\n{body}\n<!-- END {name} -->\ntail\n", encoding="utf-8")
        files[name] = path
    return files


def test_check_mode_and_missing_json(update_readme, tmp_path, capsys):
    files = _tree(tmp_path, update_readme)
    assert update_readme.main(["--check", "--root", str(tmp_path)]) == 1
    assert "block cli-reference is out of date" in capsys.readouterr().out
    assert update_readme.main(["--root", str(tmp_path), "--json", str(tmp_path / "missing.json")]) == 0
    assert "results block left unchanged" in capsys.readouterr().out
    assert "<!-- BEGIN results -->\nkept\n<!-- END results -->" in files["results"].read_text(encoding="utf-8")
    assert update_readme.main(["--check", "--root", str(tmp_path)]) == 0
    cli = files["cli-reference"].read_text(encoding="utf-8")
    assert cli.startswith("# page\n<!-- BEGIN cli-reference -->\n")
    assert cli.endswith("<!-- END cli-reference -->\ntail\n")


def test_every_block_rewritten_in_its_own_file(update_readme, tmp_path, capsys):
    import json

    files = _tree(tmp_path, update_readme)
    data = tmp_path / "quality.json"
    data.write_text(json.dumps(SAMPLE), encoding="utf-8")
    assert update_readme.main(["--root", str(tmp_path), "--json", str(data)]) == 0
    results = update_readme.read_block(files["results"].read_text(encoding="utf-8"), "results")
    assert results == update_readme.render_results(SAMPLE)
    cli = update_readme.read_block(files["cli-reference"].read_text(encoding="utf-8"), "cli-reference")
    assert cli == update_readme.cli_reference()
    capsys.readouterr()
    assert update_readme.main(["--root", str(tmp_path), "--json", str(data)]) == 0
    assert capsys.readouterr().out.count("already up to date") == len(update_readme.BLOCKS)


def test_missing_markers_name_the_file(update_readme, tmp_path):
    files = _tree(tmp_path, update_readme)
    files["cli-reference"].write_text("no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="cli.md has no '<!-- BEGIN cli-reference -->'"):
        update_readme.main(["--check", "--root", str(tmp_path)])


def test_update_results_writes_the_file_that_holds_the_block(update_readme, tmp_path):
    """bench_quality.py --update-readme calls update_results(data): by default it writes docs/benchmarks.md."""
    assert update_readme.block_file("results") == ROOT / "docs" / "benchmarks.md"
    path = _tree(tmp_path, update_readme)["results"]
    assert update_readme.update_results(SAMPLE, path) == path
    assert update_readme.read_block(path.read_text(encoding="utf-8"), "results") == update_readme.render_results(SAMPLE)
