"""The rest of the bad-input matrix (issue 13), each through a real subprocess: exit code 2, one `error:` line, no
traceback, nothing written. (test_cli.py has the recipe/option/path cases, test_preflight.py the output checks.)"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_cli import ENV, FAST_CALIB, leftovers, tiny_checkpoint  # noqa: F401 (shared session fixture)


def _copy(model: Path, work: Path) -> Path:
    dest = work / "model"
    shutil.copytree(model, dest)
    return dest


def _poisoned(value: float):
    def make(model: Path, work: Path) -> Path:
        dest = _copy(model, work)
        tensors = load_file(dest / "model.safetensors")
        name = "model.layers.1.mlp.down_proj.weight"
        tensors[name] = tensors[name].clone()
        tensors[name][3, 5] = value
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
        return dest
    return make


def _truncated(model: Path, work: Path) -> Path:
    dest = _copy(model, work)
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dest


def _garbage_header(model: Path, work: Path) -> Path:
    dest = _copy(model, work)
    data = bytearray((dest / "model.safetensors").read_bytes())
    data[8:40] = b"\x00\xff" * 16
    (dest / "model.safetensors").write_bytes(bytes(data))
    return dest


def _no_linear(model: Path, work: Path) -> Path:
    """GPT-2: its decoder blocks hold Conv1D projections, not nn.Linear."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(model)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    dest = work / "gpt2"
    gpt2.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _short_text(model: Path, work: Path) -> Path:
    path = work / "short.txt"
    path.write_text("just a few words", encoding="utf-8")
    return path


# Bytes per file (RLIMIT_FSIZE): the first journal file does not fit; or the journal's files fit and the output's
# weights (~210 kB) do not, which keeps the finished layers for --resume.
FULL_DISK, FULL_AT_FINAL_WRITE = 60_000, 150_000


# id: (model builder or None, extra args, words the error line must contain, file size limit)
BAD = {
    "nan-weight": (_poisoned(float("nan")), (), ["NaN", "down_proj"], None),
    "inf-weight": (_poisoned(float("inf")), (), ["Inf", "down_proj"], None),
    "truncated-safetensors": (_truncated, (), ["model.safetensors"], None),
    "corrupt-safetensors": (_garbage_header, (), ["model.safetensors"], None),
    "no-linear-in-layers": (_no_linear, (), ["no nn.Linear"], None),
    "rank-above-min-dim": (None, ("--set", "rank=65"), ["rank 65", "64"], None),
    "regex-does-not-compile": (None, ("--set", 'targets=["re:proj(("]'), ["re:proj((", "invalid regex"], None),
    "regex-matches-nothing": (None, ("--set", 'targets=["re:^nothing$"]'), ["re:^nothing$", "matches no"], None),
    "calib-shorter-than-a-window": (None, ("--calib", _short_text, "--seqlen", "64"),
                                    ["calibration text has 12 tokens", "windows of 64"], None),
    "unknown-method-option": (None, ("--set", "whitenning=eigh"), ["whitenning"], None),
    "disk-fills-mid-write": (None, (), ["no space left", ".out.partial"], FULL_DISK),
    "disk-fills-at-final-write": (None, (), ["no space left", "out", "--resume"], FULL_AT_FINAL_WRITE),
}


def _limit_file_size(limit):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit if limit else None


@pytest.fixture(scope="module")
def bad_runs(tiny_checkpoint, tmp_path_factory) -> dict:  # noqa: F811
    def run(case_id):
        build, extra, _, limit = BAD[case_id]
        work = tmp_path_factory.mktemp(case_id)
        model = tiny_checkpoint if build is None else build(tiny_checkpoint, work)
        extra = [a(tiny_checkpoint, work) if callable(a) else a for a in extra]
        out = work / "out"
        args = ["compress", model, "-o", out, "-r", "svd-llm-20", "--no-plots", *FAST_CALIB, *extra]
        proc = subprocess.run([sys.executable, "-m", "compressor.cli", *map(str, args)], cwd=work, env=ENV,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                              preexec_fn=_limit_file_size(limit))
        return case_id, (proc, out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, BAD))


@pytest.mark.parametrize("case_id", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_on_disk(bad_runs, case_id):
    proc, out = bad_runs[case_id]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    # Progress lines (one per layer off a terminal) and library warnings may come first; the error is one line, last.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    for word in BAD[case_id][2]:
        assert word in errors[0], (word, errors[0])
    assert not out.exists()
    # Nothing left beside the output either, unless finished layers were kept for --resume (and the line says so).
    assert leftovers(out) == ([".out.partial"] if "--resume" in errors[0] else [])
