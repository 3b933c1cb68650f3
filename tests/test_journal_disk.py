"""The resume journal on disk (issue 22, part A): finished layers in the checkpoint's dtype, one set of activations at
rest and none after the last layer, every rename fsynced, one run per output, and an identity that a re-exported
checkpoint of the same shapes cannot pass."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compressor import api
from compressor.errors import UserError
from compressor.io import fingerprint
from compressor.io.fingerprint import checkpoint_fingerprint
from compressor.io.lock import lock_holder, lock_path, output_lock
from compressor.io.preflight import check_output
from compressor.pipeline import journal as journal_module
from compressor.pipeline.journal import Journal, journal_bytes, partial_dir, run_identity
from compressor.recipe import load_recipe

from helpers import Crash, crash_after as _crash_after

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = ["calibration.nsamples=4", "calibration.seqlen=16"]
IDENTITY = {"recipe": "r", "model": "m", "calibration data": "c", "device": "cpu", "dtype": "auto", "mode": "x"}
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- 1. finished layers in the checkpoint's dtype


@pytest.mark.parametrize("recipe,extra", [
    ("svd-llm-40", ["refine.epochs=1", "refine.target=dense"]),
    ("eora-4bit", []),  # QuantLinear: int codes and fp16 scales stay as they are
])
def test_layers_are_kept_in_the_storage_dtype_and_the_resume_is_identical(tmp_path, tiny_model, calib_ids, recipe,
                                                                          extra):
    ids, bf16 = calib_ids(4, 16), torch.bfloat16
    r = load_recipe(recipe, CALIB + extra)
    reference = api.compress(tiny_model("qwen2", correlated=True), r, batches=ids, storage_dtype=bf16)
    out = tmp_path / "out"
    journal = Journal.open(out, IDENTITY, resume=False, storage_dtype=bf16, layers=2)
    with pytest.raises(Crash):
        api.compress(tiny_model("qwen2", correlated=True), r, batches=ids, storage_dtype=bf16, journal=journal,
                     progress=_crash_after(0))
    layer = partial_dir(out) / "layer-00000.safetensors"
    with safe_open(layer, framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F32" not in dtypes.values(), dtypes
    assert {"BF16"} <= set(dtypes.values())
    held = reference.model.model.layers[0].state_dict().values()  # fp32 in the run, but for codes and scales
    stored = sum(t.numel() * (min(t.element_size(), 2) if t.is_floating_point() else t.element_size()) for t in held)
    as_held = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in held)
    with layer.open("rb") as f:
        data = layer.stat().st_size - 8 - struct.unpack("<Q", f.read(8))[0]
    assert data == stored < 0.6 * as_held, (data, stored, as_held)

    model = tiny_model("qwen2", correlated=True)
    resumed = api.compress(model, r, batches=ids, storage_dtype=bf16,
                           journal=Journal.open(out, IDENTITY, resume=True, storage_dtype=bf16, layers=2))
    assert resumed.resumed_from == 1
    want, got = reference.model.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k


# ---------------------------------------------------------------- 2. one set of activations at rest, none at the end


def _hidden(value: float) -> list[torch.Tensor]:
    return [torch.full((2, 8), value), torch.full((2, 8), value + 1)]


def test_one_set_of_activations_at_rest_none_after_the_last_layer_and_leftovers_removed(tmp_path):
    out = tmp_path / "out"
    folder = partial_dir(out)
    journal = Journal.open(out, IDENTITY, resume=False, layers=3)
    journal.record(1, _hidden(1.0), None, {})
    journal.record(2, _hidden(2.0), None, {})
    assert sorted(p.name for p in folder.glob("stream-*")) == ["stream-00002.safetensors"]
    # a run killed while switching from stream 2 to 3: the half-written set and an unnamed one are left behind
    (folder / "stream-00003.safetensors.tmp").write_bytes(b"\0" * 100)
    (folder / "stream-00001.safetensors").write_bytes(b"\0" * 100)
    (folder / "layer-00002.safetensors").write_bytes(b"\0" * 100)
    journal = Journal.open(out, IDENTITY, resume=True, layers=3)
    assert sorted(p.name for p in folder.iterdir()) == ["journal.json", "stream-00002.safetensors"]
    assert journal.resumed().hidden[1][0, 0].item() == 3.0

    journal.record(3, _hidden(3.0), _hidden(4.0), {})  # the last layer: nothing will read its outputs
    assert sorted(p.name for p in folder.iterdir()) == ["journal.json"]
    resumed = Journal.open(out, IDENTITY, resume=True, layers=3).resumed()
    assert resumed.done == 3 and len(resumed.hidden) == len(resumed.dense_hidden) == 2


# ---------------------------------------------------------------- 4. fsync before every rename, and of the folder


def test_every_file_and_the_folder_are_fsynced_before_the_journal_moves(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src).name))
        real_replace(src, dst)

    journal = Journal.open(tmp_path / "out", IDENTITY, resume=False, storage_dtype=torch.bfloat16, layers=4)
    monkeypatch.setattr(journal_module.os, "fsync", fsync)
    monkeypatch.setattr(journal_module.os, "replace", replace)
    journal.record(1, _hidden(1.0), None, {}, {"w": torch.ones(4, 4)})
    folder = partial_dir(tmp_path / "out").name
    assert events == [
        ("fsync", "layer-00000.safetensors.tmp"), ("replace", "layer-00000.safetensors.tmp"), ("fsync", folder),
        ("fsync", "stream-00001.safetensors.tmp"), ("replace", "stream-00001.safetensors.tmp"), ("fsync", folder),
        ("fsync", "journal.json.tmp"), ("replace", "journal.json.tmp"), ("fsync", folder),
    ], events


# ---------------------------------------------------------------- 5. one run per output


HOLD = ("import sys, time\nfrom compressor.io.lock import output_lock\n"
        "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")


@pytest.fixture
def other_run(tmp_path):
    """Another process holding the lock of tmp_path/out, with its own temporary directory beside it."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        (tmp_path / ".out.tmp-other").mkdir()
        yield out, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(other_run):
    out, pid = other_run
    assert lock_holder(out) == pid
    with pytest.raises(UserError, match=rf"another lrc run \(pid {pid}\) is writing .*out"):
        Journal.open(out, IDENTITY, resume=False)
    with pytest.raises(UserError, match=rf"pid {pid}"):
        with output_lock(out):
            pass
    assert (out.parent / ".out.tmp-other").is_dir()  # the live run's directory is untouched
    assert not partial_dir(out).exists()


def test_the_lock_is_released_and_removed_and_a_stale_one_taken_over(tmp_path):
    out = tmp_path / "deeper" / "out"
    with output_lock(out):
        assert lock_holder(out) == os.getpid()
        Journal.open(out, IDENTITY, resume=False).discard()  # this process holds it: the journal may open
    assert not lock_path(out).exists() and not (tmp_path / "deeper").exists()  # the parent it made, removed
    out.parent.mkdir()
    lock_path(out).write_text("999999\n")  # a SIGKILLed run's file: not held by anyone
    assert lock_holder(out) is None
    with output_lock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
    assert not lock_path(out).exists()


# ---------------------------------------------------------------- 6. identity: content, revision, versions


def _flip_tensor_in_place(file: Path, name: str) -> None:
    """Negate every value of `name` (bf16/fp32 sign bits) in place: same shapes, same file size."""
    with file.open("r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(size))[name]
        begin, end = entry["data_offsets"]
        step = {"BF16": 2, "F16": 2, "F32": 4}[entry["dtype"]]
        f.seek(8 + size + begin)
        data = bytearray(f.read(end - begin))
        for i in range(step - 1, len(data), step):
            data[i] ^= 0x80
        f.seek(8 + size + begin)
        f.write(data)


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 64}')
    torch.manual_seed(0)
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(3000), "c": torch.randn(7)}  # two sampled, one read whole
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_the_model_fingerprint_sees_values_changed_in_place(tmp_path, name):
    model = _checkpoint(tmp_path / "m")
    before, size = checkpoint_fingerprint(str(model)), (model / "model.safetensors").stat().st_size
    _flip_tensor_in_place(model / "model.safetensors", name)
    assert (model / "model.safetensors").stat().st_size == size
    assert checkpoint_fingerprint(str(model))["model"] != before["model"]
    _flip_tensor_in_place(model / "model.safetensors", name)
    assert checkpoint_fingerprint(str(model)) == before == {"model": before["model"], "model revision": "none"}


def test_the_fingerprint_reads_a_few_kb_per_tensor(tmp_path, monkeypatch):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({f"t{i}": torch.zeros(256, 1024) for i in range(8)}, str(folder / "model.safetensors"))  # 8 MiB
    read = []
    real = fingerprint._sample

    def counting(f, begin, end, digest, samples=fingerprint.SAMPLES):
        real(f, begin, end, digest, samples)
        read.append(min(end - begin, samples * fingerprint.CHUNK))

    monkeypatch.setattr(fingerprint, "_sample", counting)
    checkpoint_fingerprint(str(folder))
    assert len(read) == 8 and sum(read) <= 8 * 4096


def test_a_hub_snapshot_is_known_by_its_commit(tmp_path):
    a, b = "a" * 40, "b" * 40
    for commit in (a, b):
        _checkpoint(tmp_path / "models--org--m" / "snapshots" / commit)
    first = checkpoint_fingerprint(str(tmp_path / "models--org--m" / "snapshots" / a))
    second = checkpoint_fingerprint(str(tmp_path / "models--org--m" / "snapshots" / b))
    assert first["model"] == second["model"] and (first["model revision"], second["model revision"]) == (a, b)


def test_resuming_another_model_or_version_is_refused_in_one_line(tmp_path):
    model = _checkpoint(tmp_path / "m")
    recipe, ids = load_recipe("svd-20", CALIB), torch.zeros(4, 16, dtype=torch.long)
    identity = run_identity(recipe, str(model), ids, device="cpu", dtype="auto", low_memory=False)
    assert identity["lrc version"] and identity["torch version"] == torch.__version__
    out = tmp_path / "out"
    Journal.open(out, identity, resume=False).record(1, _hidden(0.0), None, {})
    _flip_tensor_in_place(model / "model.safetensors", "a")
    changed = run_identity(recipe, str(model), ids, device="cpu", dtype="auto", low_memory=False)
    with pytest.raises(UserError, match=rf"^cannot resume: the model {model} is not the one") as error:
        Journal.open(out, changed, resume=True)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="cannot resume: the torch version differ"):
        Journal.open(out, {**identity, "torch version": "0.0"}, resume=True)
    assert Journal.open(out, {**identity, "source": "./elsewhere"}, resume=True).done == 1  # a moved folder resumes


# ---------------------------------------------------------------- 3. the pre-flight reserves the journal


def test_the_preflight_reserves_the_journal_and_says_so(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from compressor.io import preflight

    demo = ROOT / "models" / "lrc-demo-llama"
    source = preflight.source_weight_bytes(str(demo))
    recipe = load_recipe("svd-llm-40", ["calibration.nsamples=8", "calibration.seqlen=64"])
    hidden = json.loads((demo / "config.json").read_text())["hidden_size"]
    one_set = 8 * 64 * hidden * 4  # fp32 activations on the CPU
    assert journal_bytes(str(demo), source, recipe, low_memory=True, device="cpu", dtype="auto") == 2 * one_set
    dense = load_recipe("svd-llm-40", ["calibration.nsamples=8", "calibration.seqlen=64", "refine.epochs=1",
                                       "refine.target=dense"])
    assert journal_bytes(str(demo), source, dense, low_memory=True, device="cpu", dtype="auto") == 4 * one_set
    assert journal_bytes(str(demo), source, recipe, low_memory=False, device="cpu", dtype="auto") == \
        max(source, 2 * one_set)

    usage = SimpleNamespace(total=2**40, used=0, free=int(1.5 * source))  # room for the output, not the journal
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)
    check_output(tmp_path / "out", overwrite=False, expected_bytes=source)
    with pytest.raises(UserError, match=r"not enough disk space for .*out: about .* needed \(the output, and .* of "
                                        r"resume journal beside it\)"):
        check_output(tmp_path / "out", overwrite=False, expected_bytes=source, journal_bytes=source)
    start = time.perf_counter()
    with pytest.raises(UserError, match="resume journal"):
        api.compress_checkpoint(str(demo), "svd-llm-40", tmp_path / "out", show_progress=False)
    assert time.perf_counter() - start < 30 and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
