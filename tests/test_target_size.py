"""`--target-size` bounds the bytes written (issue 22 C): a fraction or a size is the whole checkpoint's weights, a
tied `lm_head` / `embed_tokens` is one tensor, and the report's weight bytes are the tensor data of the safetensors
files written, checked against the size asked before the output is published.

A tiny tied Llama (tests/conftest.py build_tiny, bf16 on disk: `save_pretrained` stores the shared embedding once)
with a 256-word tokenizer, compressed through the CLI in memory and with `--low-memory`."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.conftest import build_tiny
from tests.helpers import one_error_line, run, word_tokenizer
from tests.test_bytes import tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ("--nsamples", "4", "--seqlen", "32", "--no-plots")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(checkpoint folder, calibration text file): a tied bf16 tiny Llama and random words of its vocabulary."""
    folder = tmp_path_factory.mktemp("tied")
    model = build_tiny("llama", tie=True).to(torch.bfloat16)
    model.save_pretrained(folder / "model")
    word_tokenizer().save_pretrained(folder / "model")
    rng = random.Random(0)
    (folder / "calib.txt").write_text("\n".join(" ".join(f"w{rng.randrange(256)}" for _ in range(64))
                                                for _ in range(40)), encoding="utf-8")
    return folder / "model", folder / "calib.txt"


def dense_bytes(folder) -> int:
    return sum(tensor_bytes(folder).values())


def compress(tied, out, *args):
    model, calib = tied
    return run("compress", model, "-o", out, "--calib", calib, *FAST, *args)


def written(out) -> tuple[dict, int]:
    """(the report's totals, tensor-data bytes of the safetensors written)."""
    return json.loads((out / "report.json").read_text())["totals"], dense_bytes(out)


def test_state_bytes_counts_a_tied_embedding_once(tmp_path):
    """`state_dict()` lists a tied head and its embedding; the checkpoint stores one tensor (save_pretrained, and
    the --low-memory writer, skip `all_tied_weights_keys`)."""
    from compressor.report.summary import count_parameters, state_bytes

    model = build_tiny("llama", tie=True)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert "lm_head.weight" not in tensor_bytes(tmp_path)
    assert state_bytes(model, torch.bfloat16) == dense_bytes(tmp_path)
    assert count_parameters(model) * 2 == dense_bytes(tmp_path)
    untied = build_tiny("llama")  # two tensors, both counted
    assert state_bytes(untied) == 4 * sum(p.numel() for p in untied.parameters())


# (recipe args, slack): how far below the size asked the bytes written may fall, set by the recipe's granularity.
# auto's planning pass fills one budget for all targets (rank steps of 4 here): within 1 % (measured 0.09 %).
# svd-llm gives every target the largest rank that fits its own share, so each may leave up to one rank's bytes,
# (m + n) × 2 B: 4,096 B in all, 3.8 % of the size asked on this 64-wide model (measured 2.5 %); on a 2048-wide
# model one rank is at most 0.2 % of a target's share at half its bytes.
ONE_RANK_EACH = 2 * 2 * (2 * 128 + 2 * 96 + 3 * 192)  # 2 layers × 2 B × (m + n) of q, o; k, v; gate, up, down
RECIPES = {"auto": ((), lambda goal: 0.01 * goal), "svd-llm-20": (("-r", "svd-llm-20"), lambda goal: ONE_RANK_EACH)}


@pytest.mark.parametrize("low_memory", [False, True], ids=["memory", "low-memory"])
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("size", ["fraction", "bytes"])
def test_target_size_bounds_the_bytes_written_on_a_tied_model(tied, tmp_path, recipe, size, low_memory):
    """A fraction (0.6) is 0.6 × the dense checkpoint's bytes, like an absolute size; the safetensors written hold
    at most that, within the recipe's granularity of it, and exactly what the report says."""
    dense = dense_bytes(tied[0])
    goal = int(0.6 * dense)
    asked = "0.6" if size == "fraction" else f"{goal / 1000}kB"
    args, slack = RECIPES[recipe]
    out = tmp_path / "out"
    result = compress(tied, out, "--target-size", asked, *args, "--set", "rank_step=4" if recipe == "auto" else
                      "calibration.seed=0", *(("--low-memory",) if low_memory else ()))
    assert result.exit_code == 0, result.output
    totals, on_disk = written(out)
    assert totals["weight_bytes_before"] == dense
    assert totals["weight_bytes_after"] == on_disk
    assert goal - slack(goal) < on_disk <= goal, (on_disk / goal, totals["size_ratio"])


def test_a_size_the_recipe_cannot_reach_fails_and_writes_nothing(tied, tmp_path):
    """svd-llm keeps a target dense when no rank fits its share: the bytes written would exceed the size asked.
    The run says so in one line, and publishes nothing."""
    dense = dense_bytes(tied[0])
    out = tmp_path / "out"
    embedding = 256 * 64 * 2
    goal = embedding + 2 * 64 * 5 + int(0.01 * (dense - embedding))  # 1 % for the targets: rank 0 everywhere
    result = compress(tied, out, "-r", "svd-llm-20", "--target-size", str(goal))
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
    last = result.stderr.splitlines()[-1]  # after the progress lines of the layers
    assert last.startswith(f"error: --target-size {goal}: the weights written come to 180,864 bytes, over"), last
    assert "14 of 14 targets kept dense" in last and "nothing was published" in last
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_the_report_must_equal_the_bytes_written(tied, tmp_path, monkeypatch):
    """One source of truth: a report whose weight bytes differ from the safetensors' is never published."""
    import compressor.pipeline.run as pipeline_run

    real = pipeline_run.state_bytes
    monkeypatch.setattr(pipeline_run, "state_bytes", lambda model, dtype=None: real(model, dtype) + 1)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="safetensors"):
        compress(tied, out, "-r", "svd-llm-20")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("args,words", [
    (("--target-size", "0.5", "--set", "size_ratio=0.4"), "size_ratio"),
    (("--target-size", "100kB", "-r", "svd-llm-20", "--set", "rank=8"), "rank"),
    (("--target-size", "100kB", "-r", "rtn-4bit"), "size_ratio"),
])
def test_target_size_conflicts_fail_before_any_work(tied, tmp_path, args, words):
    out = tmp_path / "out"
    one_error_line(compress(tied, out, *args), words)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
