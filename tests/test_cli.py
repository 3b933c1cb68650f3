"""The `lrc` command line, end to end: a real subprocess for exit codes and stderr, click's CliRunner for the rest.

A tiny Llama checkpoint (random weights, bf16, byte-level BPE tokenizer of 300 tokens trained on a slice of the
bundled text) is written to disk once per session. The happy path compresses it with `svd-llm-20` and checks
the output directory; every bad input must exit with code 2, print exactly one `error: ...` line on stderr
(no traceback), and leave nothing on disk.

Each subprocess pays the `import torch, transformers` start-up (several seconds on a loaded 2-core machine), so
the bad-input runs are launched together in one module-scoped fixture and the tests only read their results.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compressor.cli import app
from compressor.recipe import Recipe, builtin_names, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("eora-4bit", "rtn-4bit", "svd-20", "svd-llm-20", "svd-llm-40")
# Offline: a bug that sends a local path to the hub must fail, not hang on the network.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FAST_CALIB = ("--nsamples", "8", "--seqlen", "64")


def lrc(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m compressor.cli ARGS` in a fresh interpreter, from `cwd` (not the repository)."""
    return subprocess.run(
        [sys.executable, "-m", "compressor.cli", *map(str, args)],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def leftovers(out: Path) -> list[str]:
    """Hidden temporary siblings of an output directory (`.out.tmp-*`, `.out.old-*`) left behind."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def safetensors_data_bytes(path: Path) -> int:
    """Bytes of tensor data in a .safetensors file: the file minus its 8-byte length and JSON header."""
    with path.open("rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


# ---------------------------------------------------------------- the tiny checkpoint on disk


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (ROOT / "calibration" / "train.txt").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- happy path: compress, then eval the output


@pytest.fixture(scope="module")
def compressed(tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("compress")
    out = work / "out"
    proc = lrc("compress", tiny_checkpoint, "-r", "svd-llm-20", "-o", out, "--eval", *FAST_CALIB,
               "--eval-max-windows", "10", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_compress_writes_a_complete_checkpoint(compressed):
    out, proc = compressed
    assert "Traceback" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "recipe.yaml",
                 "report.json", "report.md"):
        assert (out / name).is_file(), name
    assert leftovers(out) == []
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "lrc" and qc["method"] == "svd-llm" and qc["recipe"] == "svd-llm-20"
    # plain transformers refuses it (tests/test_loading_without_lrc.py) instead of loading random weights
    assert json.loads((out / "config.json").read_text())["model_type"].startswith("lrc (")
    assert qc["base_model_type"] == "llama"
    assert len(qc["modules"]) == 14  # 7 linears x 2 layers
    recipe = Recipe(**yaml.safe_load((out / "recipe.yaml").read_text()))
    assert recipe.name == "svd-llm-20" and recipe.calibration.nsamples == 8 and recipe.calibration.seqlen == 64
    assert "svd-llm-20" in (out / "report.md").read_text()


def test_progress_off_a_terminal_is_a_line_per_layer_and_eval_chunk(compressed):
    """Piped (not a TTY), rich would print nothing until the end: plain lines with elapsed time instead."""
    _, proc = compressed
    lines = proc.stderr.splitlines()
    starts = [line.split(",")[0] for line in lines]
    assert starts == [*(f"perplexity (before): windows {n}/10" for n in (4, 8, 10)),
                      "svd-llm-20: layers 1/2", "svd-llm-20: layers 2/2",
                      *(f"perplexity (after): windows {n}/10" for n in (4, 8, 10))], proc.stderr
    assert all(" elapsed, " in line for line in lines)


def test_report_json(compressed):
    out, _ = compressed
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "svd-llm-20" and report["method"] == "svd-llm"
    assert report["calibration"]["nsamples"] == 8 and report["calibration"]["seqlen"] == 64
    ppl = report["perplexity"]
    assert 1 < ppl["before"] < 1e4 and 1 < ppl["after"] < 1e4
    assert ppl["windows"] == 10 and ppl["seqlen"] == 128  # eval window capped at max_position_embeddings
    modules = report["modules"]
    assert len(modules) == 14 and all(m["compressed"] for m in modules)
    for m in modules:
        rows, cols = m["shape"]
        rank = m["spec"]["rank"]
        assert m["spec"]["kind"] == "lowrank" and rank == int(0.8 * rows * cols // (rows + cols))
        assert m["params_before"] == rows * cols and m["params_after"] == rank * (rows + cols)
        assert 0 < m["rel_weight_error"] < 1 and 0 < m["rel_output_error"] < 1
    totals = report["totals"]
    assert totals["target_params_before"] == sum(m["params_before"] for m in modules)
    assert totals["target_params_after"] == sum(m["params_after"] for m in modules)
    removed = totals["model_params_before"] - totals["model_params_after"]
    assert removed == totals["target_params_before"] - totals["target_params_after"]
    assert 0.19 < removed / totals["target_params_before"] < 0.22  # 20% asked; ranks round down
    phases = report["timings_seconds"]  # every phase the issue names, the save included (written after it)
    assert {"load", "calibration_data", "statistics", "decomposition", "save", "eval_before", "eval_after"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and phases["compress_total"] >= phases["decomposition"]
    assert report["peak_memory"]["cpu_peak_rss_bytes"] > 50 * 2**20


def test_eval_of_the_output_reproduces_the_reported_perplexity(compressed):
    out, _ = compressed
    report = json.loads((out / "report.json").read_text())
    proc = lrc("eval", out, "--json", "--max-windows", "10", cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["windows"] == 10 and result["seqlen"] == report["perplexity"]["seqlen"]
    assert result["ppl"] == pytest.approx(report["perplexity"]["after"], rel=1e-4)
    # piped: one progress line per batch of windows (default batch size 4), with rate and elapsed time
    assert [line.split(",")[0] for line in proc.stderr.splitlines()] == [
        f"perplexity: windows {n}/10" for n in (4, 8, 10)], proc.stderr


def test_checkpoint_is_smaller_in_proportion_to_the_parameter_cut(compressed, tiny_checkpoint):
    out, _ = compressed
    totals = json.loads((out / "report.json").read_text())["totals"]
    dense, small = tiny_checkpoint / "model.safetensors", out / "model.safetensors"
    # bf16 in and out: the tensor data is exactly 2 bytes per parameter on both sides.
    assert safetensors_data_bytes(dense) == 2 * totals["model_params_before"]
    assert safetensors_data_bytes(small) == 2 * totals["model_params_after"] == totals["weight_bytes_after"]
    ratio = totals["model_params_after"] / totals["model_params_before"]
    assert small.stat().st_size / dense.stat().st_size == pytest.approx(ratio, rel=0.02)  # headers differ a little


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing on disk


def _recipe_with_unknown_key(work: Path) -> Path:
    data = yaml.safe_load(load_recipe("svd-llm-20").to_yaml())
    data["colour"] = "red"
    path = work / "typo.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _empty_file(work: Path) -> Path:
    path = work / "empty.txt"
    path.write_text("\n\n  \n", encoding="utf-8")
    return path


def _a_file(work: Path) -> Path:
    path = work / "weights.bin"
    path.write_bytes(b"not a model")
    return path


def _a_dir(work: Path) -> Path:
    path = work / "no-config"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"")
    return path


# id: (model (None = the tiny checkpoint, or a builder of the path), extra args, words the error line must contain)
BAD = {
    "missing-model": (lambda w: w / "no-such-model", (), ["not found", "no-such-model"]),
    "model-is-a-file": (_a_file, (), ["not a directory", "weights.bin"]),
    "model-dir-without-config": (_a_dir, (), ["no config.json", "no-config"]),
    "unknown-recipe": (None, ("-r", "svd-llm-99"), ["svd-llm-99", *BUILTIN]),
    "recipe-file-unknown-key": (None, ("-r", _recipe_with_unknown_key), ["unknown key", "colour"]),
    "rank-0": (None, ("--set", "rank=0"), ["rank"]),
    "param-ratio-1.5": (None, ("--set", "param_ratio=1.5"), ["param_ratio"]),
    "param-ratio-0": (None, ("--set", "param_ratio=0"), ["param_ratio"]),
    "eora-bits-9": (None, ("-r", "eora-4bit", "--set", "bits=9"), ["bits"]),
    "rtn-bits-1": (None, ("-r", "rtn-4bit", "--set", "bits=1"), ["bits"]),
    "unknown-set-key": (None, ("--set", "nonsense=1"), ["nonsense", "unknown key"]),
    "target-matches-nothing": (None, ("--set", 'targets=["*nomatch*"]'), ["*nomatch*", "matches no"]),
    "output-exists": (None, (), ["exists", "--overwrite"]),
    "calib-missing": (None, ("--calib", lambda w: w / "missing.txt"), ["calibration", "not found", "missing.txt"]),
    "calib-empty": (None, ("--calib", _empty_file), ["calibration", "no text", "empty.txt"]),
    "eval-data-missing": (None, ("--eval", "--eval-data", lambda w: w / "gone.txt"), ["evaluation", "gone.txt"]),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_checkpoint, tmp_path_factory) -> dict:
    """Run every BAD case in its own fresh interpreter, several at a time; {id: (completed process, out dir)}."""

    def prepare(case_id):
        model, extra, _ = BAD[case_id]
        work = tmp_path_factory.mktemp(case_id)
        model = tiny_checkpoint if model is None else model(work)
        extra = [a(work) if callable(a) else a for a in extra]
        if not any(a in ("-r", "--recipe") for a in extra):
            extra = ["-r", "svd-llm-20", *extra]
        out = work / "out"
        if case_id == "output-exists":
            out.mkdir()
            (out / "keep.txt").write_text("mine", encoding="utf-8")
        return ["compress", model, "-o", out, *FAST_CALIB, *extra], out, work

    def run(case_id):
        args, out, work = prepare(case_id)
        return case_id, (lrc(*args, cwd=work, timeout=120), out)

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(pool.map(run, BAD))


CASES = list(BAD)


@pytest.mark.parametrize("case_id", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_on_disk(bad_runs, case_id):
    proc, out = bad_runs[case_id]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][len("error: "):].strip(), proc.stderr
    for word in BAD[case_id][2]:
        assert word in lines[0], (word, lines[0])
    assert leftovers(out) == []
    if case_id == "output-exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"
    else:
        assert not out.exists()


# ---------------------------------------------------------------- in-process: recipes and help


def invoke(*args):
    result = CliRunner().invoke(app, list(args), prog_name="lrc")
    assert result.exit_code == 0, result.output
    return result.output


def test_recipes_list_shows_every_builtin():
    assert set(BUILTIN) <= set(builtin_names())
    listing = invoke("recipes", "list")
    for name in BUILTIN:
        assert name in listing


def test_recipes_show_is_valid_yaml_that_round_trips(tmp_path):
    text = invoke("recipes", "show", "svd-llm-20")
    recipe = Recipe(**yaml.safe_load(text))
    assert recipe.method_options() == load_recipe("svd-llm-20").method_options()
    written_out = load_recipe("svd-llm-20", ["allocation_options.weight=loss"])  # the default weight, written out
    assert recipe.model_copy(update={"options": {}}) == written_out.model_copy(update={"options": {}})
    # every option default written out (docs/usage.md: "with every default filled in"), unset alternatives left out
    assert recipe.options["param_ratio"] == 0.8 and "rank" not in recipe.options
    for key in ("svd_solver", "eig_floor", "whitening", "factor_bits", "beta", "ridge"):
        assert key in recipe.options, key
    path = tmp_path / "mine.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_recipe(str(path)) == recipe
    assert invoke("recipes", "show", str(path)) == text


def test_recipes_show_in_a_subprocess_writes_the_method_defaults(tmp_path):
    proc = lrc("recipes", "show", "eora-4bit", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    options = yaml.safe_load(proc.stdout)["options"]
    assert options == {"bits": 4, "group_size": 128, "symmetric": False, "clip": False, "base": "rtn", "rank": 64,
                       "eig_floor": 1e-06, "svd_solver": "gram", "whitening": "eigh"}


@pytest.mark.parametrize("name", ["eora-4bit", "eora-gptq-4bit", "rtn-4bit", "lowrank-sparse-50"])
def test_recipes_show_fills_defaults_that_stay_valid(name):
    recipe = Recipe(**yaml.safe_load(invoke("recipes", "show", name)))
    assert recipe.method_options() == load_recipe(name).method_options()
    assert set(recipe.options) >= set(load_recipe(name).options)
    if name == "eora-4bit":  # GPTQ-only options are invalid under an RTN base: not written
        assert {"rank", "eig_floor", "svd_solver", "whitening"} <= set(recipe.options) and "damp" not in recipe.options


@pytest.mark.parametrize("command,expected", [
    ((), ["compress", "eval", "recipes", "demo"]),
    (("compress",), ["MODEL", "--recipe", "--output", "--set", "--calib", "--nsamples", "--seqlen", "--seed",
                     "--dense-inputs", "--eval", "--eval-data", "--eval-seqlen", "--eval-max-windows", "--overwrite",
                     "--device", "--dtype", "--trust-remote-code"]),
    (("eval",), ["MODEL", "--data", "--seqlen", "--batch-size", "--max-windows", "--json", "--device"]),
    (("recipes",), ["list", "show"]),
    (("recipes", "list"), []),
    (("recipes", "show"), ["NAME"]),
    (("demo",), ["--output", "--device"]),
])
def test_help(command, expected):
    text = invoke(*command, "--help")
    assert text.startswith("Usage: lrc")
    for word in expected:
        assert word in text


def test_version():
    assert "0.1.0" in invoke("--version")


def test_target_size_budgets_bytes_with_auto_or_the_given_recipe(tiny_checkpoint, tmp_path):
    from tests.helpers import one_error_line, run

    # A fraction is of the whole dense checkpoint (issue 22): the embeddings keep their bytes, the targets get less
    result = run("compress", tiny_checkpoint, "--target-size", "0.6", "-o", tmp_path / "auto", "--no-plots",
                 *FAST_CALIB)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    t = report["totals"]
    assert report["recipe"] == "auto" and 0.3 < report["options"]["size_ratio"] < 0.6
    assert 0.59 * t["weight_bytes_before"] < t["weight_bytes_after"] <= 0.6 * t["weight_bytes_before"]
    assert t["size_ratio"] <= report["options"]["size_ratio"] and "target bytes" in result.output
    result = run("compress", tiny_checkpoint, "-r", "svd-llm-int8-40", "--target-size", "0.5", "-o",
                 tmp_path / "int8", "--no-plots", *FAST_CALIB)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "int8" / "report.json").read_text())
    t = report["totals"]
    assert report["options"]["factor_bits"] == 8 and t["weight_bytes_after"] <= 0.5 * t["weight_bytes_before"]
    one_error_line(run("compress", tiny_checkpoint, "-o", tmp_path / "none"), "--target-size")


def test_target_size_in_bytes_bounds_the_whole_checkpoint(tiny_checkpoint, tmp_path):
    """An absolute size is the whole checkpoint's weights: what embeddings and norms take is left out of the
    targets' share, and the written weights fit."""
    from tests.helpers import one_error_line, run

    before = sum(f.stat().st_size for f in Path(tiny_checkpoint).glob("*.safetensors"))
    goal = int(before * 0.6)
    result = run("compress", tiny_checkpoint, "--target-size", f"{goal / 1000:.3f}kB", "-o", tmp_path / "b",
                 "--no-plots", *FAST_CALIB)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    t = report["totals"]
    assert t["weight_bytes_after"] <= goal < t["weight_bytes_before"]
    assert t["weight_bytes_after"] > goal - 0.03 * t["weight_bytes_before"]  # spent, not wasted
    assert report["options"]["size_ratio"] < 0.6  # the embeddings keep their bytes: the targets get less
    for bad, words in (("12", "embeddings"), (f"{before * 2}", "nothing to compress"), ("1.5", "fraction"),
                       ("4 parsecs", "4.5GB")):
        one_error_line(run("compress", tiny_checkpoint, "--target-size", bad, "-o", tmp_path / "x"), words)
        assert not (tmp_path / "x").exists()
