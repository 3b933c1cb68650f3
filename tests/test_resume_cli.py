"""`lrc compress --resume` after a SIGKILL at several points gives the tensors of an uninterrupted run (issue 13).

Real subprocesses, killed by the fault points of compressor/pipeline/journal.py (LRC_FAULT), on test_cli's tiny bf16 Llama
checkpoint; the runs of each phase are launched together to share the interpreter start-up time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_cli import ENV, leftovers, tiny_checkpoint  # noqa: F401 (a session fixture shared with test_cli)
from tests.test_journal_disk import _flip_tensor_in_place

# Refinement towards the dense outputs: the journal must carry both activation streams.
ARGS = ("-r", "svd-llm-40", "--set", "refine.epochs=1", "--set", "refine.target=dense", "--nsamples", "4",
        "--seqlen", "32", "--no-plots")
CASES = {  # case -> (fault point, extra flags)
    "before-layers": ("before-layers", ()),
    "mid-run": ("after-layer:1", ()),
    "final-write": ("final-write", ()),
    "low-memory mid-run": ("after-layer:1", ("--low-memory",)),
    "low-memory final-write": ("final-write", ("--low-memory",)),
}


def _lrc(model: Path, out: Path, *flags, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "LRC_FAULT": fault} if fault else ENV
    return subprocess.run([sys.executable, "-m", "compressor.cli", "compress", str(model), "-o", str(out), *ARGS,
                           *flags], cwd=out.parent, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def _parallel(jobs):
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: job(), jobs))


def _tensors(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("resume")
    (work / "ref").mkdir()
    outs = {case: work / case.replace(" ", "-") / "out" for case in CASES}
    for out in outs.values():
        out.parent.mkdir()
    references = {mode: work / "ref" / mode for mode in ("in-memory", "low-memory")}
    killed = _parallel([lambda c=c: _lrc(tiny_checkpoint, outs[c], *CASES[c][1], fault=CASES[c][0]) for c in CASES]
                       + [lambda: _lrc(tiny_checkpoint, references["in-memory"]),
                          lambda: _lrc(tiny_checkpoint, references["low-memory"], "--low-memory")])
    state = {c: (p.returncode, outs[c].exists(), leftovers(outs[c])) for c, p in zip(CASES, killed)}
    layer = outs["mid-run"].parent / ".out.partial" / "layer-00000.safetensors"
    with safe_open(layer, framework="pt") as f:  # what the journal kept of layer 0, in the checkpoint's bf16
        kept = {f.get_slice(k).get_dtype() for k in f.keys()}
    refused = _lrc(tiny_checkpoint, outs["mid-run"])  # no --resume: refused, the partial run kept
    resumed = _parallel([lambda c=c: _lrc(tiny_checkpoint, outs[c], *CASES[c][1], "--resume") for c in CASES])
    return {"killed": state, "kept dtypes": kept, "refs": references, "ref_runs": killed[len(CASES):],
            "refused": refused,
            "resumed": dict(zip(CASES, resumed)), "outs": outs}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_gives_the_uninterrupted_tensors(runs, case):
    assert all(p.returncode == 0 for p in runs["ref_runs"]), [p.stderr[-2000:] for p in runs["ref_runs"]]
    code, out_existed, left = runs["killed"][case]
    assert code == -9 and not out_existed, (code, left)
    assert f".out.partial" in left
    proc = runs["resumed"][case]
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = runs["outs"][case]
    assert leftovers(out) == []
    assert not {"journal.json"} & {p.name for p in out.iterdir()}
    mode = "low-memory" if "low-memory" in case else "in-memory"
    want, got = _tensors(runs["refs"][mode]), _tensors(out)
    assert want.keys() == got.keys()
    assert all((want[k] == got[k]).all() for k in want), [k for k in want if not (want[k] == got[k]).all()][:3]
    report = json.loads((out / "report.json").read_text())
    expected = {"before-layers": None, "mid-run": 1, "final-write": 2}[case.removeprefix("low-memory ")]
    assert report.get("resumed_from_layer") == expected


def test_a_leftover_run_without_resume_is_refused_with_the_hint(runs):
    proc = runs["refused"]
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "pass --resume" in proc.stderr and "1 decoder layers done" in proc.stderr


def test_resuming_with_another_recipe_is_refused(runs, tiny_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    killed = _lrc(tiny_checkpoint, out, fault="after-layer:1")
    assert killed.returncode == -9
    env = dict(ENV)
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", "compress", str(tiny_checkpoint), "-o", str(out),
                           *ARGS, "--set", "calibration.seed=7", "--resume"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot resume" in proc.stderr and "recipe" in proc.stderr
    assert (tmp_path / ".out.partial" / "journal.json").is_file()  # kept for a correct --resume
    assert os.environ.get("LRC_FAULT") is None


def test_ctrl_c_keeps_a_resumable_journal_or_nothing_and_says_which(tiny_checkpoint, tmp_path):  # noqa: F811
    outs = {point: tmp_path / point.replace(":", "-") / "out" for point in ("before-layers", "after-layer:1")}
    for out in outs.values():
        out.parent.mkdir()
    procs = _parallel([lambda p=p: _lrc(tiny_checkpoint, outs[p], fault=f"SIGINT@{p}") for p in outs])
    early, mid = procs
    assert early.returncode == 130 and early.stderr.rstrip().endswith("interrupted; nothing was written"), early.stderr
    assert leftovers(outs["before-layers"]) == [] and not outs["before-layers"].exists()
    assert mid.returncode == 130 and "Traceback" not in mid.stderr, mid.stderr
    last = mid.stderr.rstrip().splitlines()[-1]
    assert last.startswith("interrupted; the 1 finished decoder layers are kept in") and "--resume" in last, last
    assert leftovers(outs["after-layer:1"]) == [".out.partial"] and not outs["after-layer:1"].exists()


def test_the_journal_keeps_layers_in_the_checkpoints_dtype(runs):
    assert runs["kept dtypes"] == {"BF16"}  # the run computes in fp32 on the CPU; the checkpoint is bf16


def test_resuming_after_the_weights_changed_in_place_is_refused(tiny_checkpoint, tmp_path):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    out = tmp_path / "out"
    killed = _lrc(model, out, fault="after-layer:1")
    assert killed.returncode == -9
    _flip_tensor_in_place(model / "model.safetensors", "model.layers.1.mlp.down_proj.weight")  # same shape and size
    proc = _lrc(model, out, "--resume")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot resume: the model {model} is not the one"), proc.stderr
    assert (tmp_path / ".out.partial" / "journal.json").is_file() and not out.exists()


def test_a_second_run_on_the_same_output_is_refused_at_once(tiny_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    hold = ("import sys, time\nfrom compressor.io.lock import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n")
    first = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        (tmp_path / ".out.tmp-first").mkdir()  # the first run's final write, half-way
        proc = _lrc(tiny_checkpoint, out)
    finally:
        first.kill()
        first.wait()
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"another lrc run (pid {first.pid}) is writing {out}" in proc.stderr, proc.stderr
    assert "calibrat" not in proc.stderr and (tmp_path / ".out.tmp-first").is_dir() and not out.exists()
