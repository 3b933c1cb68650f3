"""Refusals that can be decided before the model is loaded are made before it: a read-only output location,
`--overwrite` on a folder that is no checkpoint, too little disk space, a typo in a local model path, an
unreachable hub id. Each case is a real `lrc` subprocess on the shipped demo model: exit code 2, one `error:` line,
no progress line (nothing was calibrated), nothing on disk, and well under the time a compression takes.

The subprocesses run a few at a time in one module fixture (each pays the torch/transformers import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from compressor.errors import UserError
from compressor.io.preflight import check_model_source, check_output, export_bytes, looks_local

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "lrc-demo-llama"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# `lrc` with shutil.disk_usage reporting 4 KiB free: the disk-space refusal without filling a disk.
LOW_DISK = ("import shutil, sys\nfrom collections import namedtuple\n"
            "shutil.disk_usage = lambda path: namedtuple('usage', 'total used free')(2**40, 2**40 - 2**12, 2**12)\n"
            "from compressor.cli import main\nsys.argv[0] = 'lrc'\nmain()\n")
FAST = ("--nsamples", "8", "--seqlen", "64")


def _read_only_dir(work: Path) -> Path:
    """A directory nobody may create entries in. root ignores permission bits; /sys is read-only even for it."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = work / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _not_a_checkpoint(work: Path) -> Path:
    folder = work / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")
    return folder


def _lrc_checkpoint(work: Path) -> Path:
    from tests.test_io import build, compress, mixed_plan, save

    return save(compress(build("llama"), mixed_plan()), work / "lrc-out")


# id: (argument builder work -> argv, words the error line must contain, cwd is the repository?, low disk?)
CASES = {
    "compress-read-only-output": (lambda w: ["compress", DEMO, "-r", "svd-20", "-o", _read_only_dir(w) / "out",
                                             *FAST], ["not writable", "out"], False, False),
    "compress-overwrite-not-a-checkpoint": (lambda w: ["compress", DEMO, "-r", "svd-20", "-o", _not_a_checkpoint(w),
                                                       "--overwrite", *FAST], ["refusing to overwrite", "mine"],
                                            False, False),
    "compress-low-disk": (lambda w: ["compress", DEMO, "-r", "svd-20", "-o", w / "out", *FAST],
                          ["not enough disk space", "MiB"], False, True),
    "compress-path-typo": (lambda w: ["compress", "models/lrc-demo-lama", "-r", "svd-20", "-o", w / "out", *FAST],
                           ["model directory not found: models/lrc-demo-lama", "did you mean models/lrc-demo-llama"],
                           True, False),
    "eval-hub-id-offline": (lambda w: ["eval", "no-such-org/no-such-model"],
                            ["no-such-org/no-such-model", "HF_HUB_OFFLINE"], False, False),
    "export-read-only-output": (lambda w: ["export", _lrc_checkpoint(w), "--dense", "-o", _read_only_dir(w) / "d"],
                                ["not writable"], False, False),
    "export-overwrite-not-a-checkpoint": (lambda w: ["export", _lrc_checkpoint(w), "--dense", "-o",
                                                     _not_a_checkpoint(w), "--overwrite"],
                                          ["refusing to overwrite"], False, False),
    "export-low-disk": (lambda w: ["export", _lrc_checkpoint(w), "--dense", "-o", w / "dense"],
                        ["not enough disk space"], False, True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    def run(case_id):
        build, _, in_repo, low_disk = CASES[case_id]
        work = tmp_path_factory.mktemp(case_id)
        args = [str(a) for a in build(work)]
        code = ["-c", LOW_DISK] if low_disk else ["-m", "compressor.cli"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *code, *args], cwd=ROOT if in_repo else work, env=ENV,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        return case_id, (proc, time.perf_counter() - start, work)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, CASES))


@pytest.mark.parametrize("case_id", list(CASES))
def test_refused_up_front_in_one_line(runs, case_id):
    proc, seconds, work = runs[case_id]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr  # no traceback, no progress line
    for word in CASES[case_id][1]:
        assert word in lines[0], (word, lines[0])
    # A compression of the demo model takes minutes; the import alone a few seconds on a busy 2-core machine.
    assert seconds < 60, seconds
    assert not [p for p in work.rglob(".*tmp-*")] and not [p for p in work.rglob(".*preflight-*")]
    assert not (work / "out").exists() and not (work / "dense").exists()
    if "not-a-checkpoint" in case_id:
        assert sorted(p.name for p in (work / "mine").iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- in-process: the rules themselves


@pytest.mark.parametrize("name,local", [
    ("models/lrc-demo-lama", True), ("./x", True), ("/abs/x", True), ("~/x", True), ("a/b/c", True),
    ("plain-name", True), ("org/name/", True), ("Qwen/Qwen2.5-0.5B", False), ("no-such-org/model", False),
])
def test_what_counts_as_a_local_path(name, local, monkeypatch):
    monkeypatch.chdir(ROOT)  # models/ exists here: `models/x` is a path, not the hub organisation "models"
    assert looks_local(name) is local


def test_model_source_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        (tmp_path / "f").write_text("x")
        check_model_source(str(tmp_path / "f"))
    with pytest.raises(UserError, match="no config.json"):
        check_model_source(str(tmp_path))
    (tmp_path / "my-model").mkdir()
    with pytest.raises(UserError, match=r"not found: .*my-modle; did you mean .*my-model\?"):
        check_model_source(str(tmp_path / "my-modle"))
    check_model_source(str(DEMO))  # a checkpoint passes


def test_output_rules(tmp_path):
    check_output(tmp_path / "new" / "deeper" / "out", overwrite=False)  # missing parents are created by the writer
    assert not (tmp_path / "new").exists()  # ... but not by the check
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output(tmp_path / "file" / "out", overwrite=False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="exists"):
        check_output(tmp_path / "ckpt", overwrite=False)
    check_output(tmp_path / "ckpt", overwrite=True)  # a checkpoint may be replaced ...
    with pytest.raises(UserError, match="the output is the source checkpoint itself"):  # ... unless it is the input
        check_output(tmp_path / "ckpt", overwrite=True, source=str(tmp_path / "ckpt" / "." ))
    check_output(tmp_path / "out", overwrite=False, expected_bytes=1)
    with pytest.raises(UserError, match="not enough disk space"):
        check_output(tmp_path / "out", overwrite=False, expected_bytes=2**60)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_size_scales_to_dense(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert export_bytes(tmp_path, dense=True) == export_bytes(tmp_path, dense=False) == 1000
    report = {"totals": {"weight_bytes_before": 400, "weight_bytes_after": 100}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert export_bytes(tmp_path, dense=True) == 4000 and export_bytes(tmp_path, dense=False) == 1000


def test_hub_ids_are_asked_once_and_their_download_must_fit(monkeypatch):
    """No network here: HfApi.model_info is replaced; the rules around it are what is tested."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    from compressor.io import preflight

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def model_info(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("timeout")))
        if repo_id == "org/missing":
            raise RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, status_code=404, request=None))
        if repo_id == "org/offline":
            raise ConnectionError("[Errno -2] Name or service not known")
        files = [SimpleNamespace(rfilename="model-00001-of-00002.safetensors", size=3 * 2**30),
                 SimpleNamespace(rfilename="model-00002-of-00002.safetensors", size=2**30),
                 SimpleNamespace(rfilename="config.json", size=700)]
        return SimpleNamespace(siblings=files)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    assert check_model_source("org/model") == 4 * 2**30
    with pytest.raises(UserError, match="no hub model org/missing"):
        check_model_source("org/missing")
    with pytest.raises(UserError, match="cannot reach the hub for org/offline .*Name or service not known"):
        check_model_source("org/offline")
    assert all(timeout for _, timeout in calls)  # one bounded request each, not a retry loop
    usage = lambda path: SimpleNamespace(total=2**40, used=2**40 - 2**30, free=2**30)  # noqa: E731
    monkeypatch.setattr(preflight.shutil, "disk_usage", usage)
    with pytest.raises(UserError, match=r"not enough disk space to download org/model: 4.00 GiB .*HF_HOME"):
        check_model_source("org/model")
