"""`torchrun --nproc-per-node 2 -m compressor compress …` (gloo, CPU) gives one process's output (issue 23).

Real launches on a tiny fp32 Llama written to disk: each recipe is compressed once by one process and once by two,
and the two checkpoints are compared module by module — the weight each module computes with (low-rank factors
of nearly equal singular values may rotate between runs whose sums were added in another order; their product
may not), every other tensor, and the report's ranks and encodings. One rank killed mid-run ends the run on the
other within the collective timeout with nothing published; `--resume` (two processes, or one) then finishes it
with the tensors of an uninterrupted run. Each launch pays the interpreter start-up of two ranks and the
launcher: the one-process and two-process runs of a recipe go side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.test_cli import ENV, _train_tokenizer

ARGS = ("--nsamples", "4", "--seqlen", "16", "--no-plots")
THREADS = {**ENV, "OMP_NUM_THREADS": "1"}
TIMEOUT = 20  # --collective-timeout of the failure test (seconds)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dist") / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _compress(model: Path, out: Path, *flags, procs: int = 1, env=None) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "compressor"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "compressor"]
    return subprocess.run([*launch, "compress", str(model), "-o", str(out), *ARGS, *flags], cwd=out.parent,
                          env=env or THREADS, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def _both(model: Path, work: Path, *flags):
    """The one-process and the two-process run of the same command, side by side."""
    work.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(_compress, model, work / f"out{p}", *flags, procs=p) for p in (1, 2)]
        one, two = (j.result() for j in jobs)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return work / "out1", work / "out2"


def assert_same_output(a: Path, b: Path, tol: float = 1e-4) -> None:
    """Same modules with the same specs (ranks, encodings), the same computed weights and other tensors."""
    from compressor.api import load_compressed

    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert [(m["name"], m["compressed"], m["spec"]) for m in ra["modules"]] == \
        [(m["name"], m["compressed"], m["spec"]) for m in rb["modules"]]
    ma, mb = load_compressed(a), load_compressed(b)
    compressed = {m["name"] for m in ra["modules"] if m["compressed"]}
    assert compressed, "nothing was compressed: the comparison would prove nothing"
    for name in compressed:
        wa, wb = (m.get_submodule(name).dense_weight().detach().double() for m in (ma, mb))
        assert float((wa - wb).norm() / wa.norm()) < tol, name
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not any(key.startswith(name + ".") for name in compressed):
            torch.testing.assert_close(sa[key], sb[key], rtol=tol, atol=1e-6, msg=key)


@pytest.mark.parametrize("flags", [
    ("-r", "svd-llm-20"),  # compressed inputs, the cross statistics of the dense stream
    ("-r", "eora-gptq-4bit"),  # GPTQ's Hessian, EoRA's residual on it
], ids=["svd-llm-20", "eora-gptq-4bit"])
def test_two_processes_equal_one(tiny_fp32, tmp_path, flags):
    one, two = _both(tiny_fp32, tmp_path / "w", *flags)
    assert_same_output(one, two)
    assert not [p for p in tmp_path.glob("w/.*")]  # no lock, journal or temporary directory left


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ("-r", "eora-4bit"),
    ("-r", "lowrank-20"),  # block refinement: gradients summed over the processes
    ("--target-size", "0.4"),  # auto: the planning pass and the byte-budget plan
    ("-r", "fwsvd-20"),  # the Fisher pass
    ("-r", "svd-llm-20", "--low-memory"),  # layers read from disk by every process, rank 0 writes the shards
], ids=["eora-4bit", "lowrank-20", "target-size", "fwsvd", "low-memory"])
def test_two_processes_equal_one_slow(tiny_fp32, tmp_path, flags):
    one, two = _both(tiny_fp32, tmp_path / "w", *flags)
    assert_same_output(one, two)


def _killed_beside_reference(model, tmp_path, flags, fault: str):
    """A one-process reference run to `ref`, and beside it a 2-process run to `out` whose rank 1 is SIGKILLed at
    the fault point `fault`; returns (ref, out, the killed run, its seconds)."""
    ref, out = tmp_path / "ref" / "out", tmp_path / "run" / "out"
    ref.parent.mkdir()
    out.parent.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference = pool.submit(_compress, model, ref, *flags)
        t0 = time.monotonic()
        killed = _compress(model, out, *flags, procs=2, env={**THREADS, "LRC_FAULT": f"rank1:{fault}"})
        elapsed = time.monotonic() - t0
        assert reference.result().returncode == 0
    return ref, out, killed, elapsed


def test_a_killed_rank_ends_the_run_and_resume_finishes_it(tiny_fp32, tmp_path):
    flags = ("-r", "svd-llm-20", "--collective-timeout", str(TIMEOUT))
    # rank 1 dies (SIGKILL) once its part of layer 0's journal entry is sent; rank 0 must not wait for it
    ref, out, killed, elapsed = _killed_beside_reference(tiny_fp32, tmp_path, flags, "after-layer:1")
    assert killed.returncode != 0
    assert elapsed < TIMEOUT + 60, elapsed  # the launch itself takes ~20 s on a loaded 2-core machine
    assert not out.exists()
    errors = [line for line in killed.stderr.splitlines() if line.startswith("error: ")]
    assert errors and ("another process" in errors[0] or "stopped by the launcher" in errors[0]), killed.stderr[-2000:]
    journal = json.loads((out.parent / ".out.partial" / "journal.json").read_text())
    assert journal["done"] >= 1
    # another world size: one process resumes what two started
    resumed = _compress(tiny_fp32, out, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["resumed_from_layer"] == journal["done"]
    assert_same_output(ref, out)


@pytest.mark.slow
def test_two_processes_resume_their_own_run(tiny_fp32, tmp_path):
    flags = ("-r", "lowrank-20", "--collective-timeout", str(TIMEOUT))
    ref, out, killed, _ = _killed_beside_reference(tiny_fp32, tmp_path, flags, "after-layer:2")
    assert killed.returncode != 0 and not out.exists()
    resumed = _compress(tiny_fp32, out, *flags, "--resume", procs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_output(ref, out)


# Rank 1 reaches the window check 3 s after rank 0 (sitecustomize runs in every process the launcher starts): a
# rank that exits at once gets the slower one stopped by the launcher (SIGTERM) before it says its line.
_SLOW_RANK_1 = """
import os, time
if os.environ.get("RANK") == "1":
    import compressor.pipeline.distributed as d
    def slow(f):
        return lambda *a, **k: (time.sleep(3), f(*a, **k))[1]
    d.shard, d.sharded_journal = slow(d.shard), slow(d.sharded_journal)
"""


@pytest.mark.parametrize("slow_rank", [False, True])
def test_bad_input_refused_by_every_rank(tiny_fp32, tmp_path, slow_rank):
    """Fewer windows than processes: one line from each rank, exit 2 from each, nothing on disk."""
    out, env, work = tmp_path / "out", dict(THREADS), tmp_path / "work"
    work.mkdir()
    if slow_rank:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SLOW_RANK_1)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "compressor", "compress", str(tiny_fp32), "-o", str(out), "-r", "svd-llm-20",
                           "--nsamples", "1", "--seqlen", "16", "--no-plots"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert proc.stderr.count("error: 1 calibration windows for 2 processes") == 2, proc.stderr[-2000:]
    assert "stopped by the launcher" not in proc.stderr
    assert sorted(p.name for p in work.iterdir()) == []


def test_one_process_never_touches_torch_distributed(tiny_fp32, tmp_path, monkeypatch):
    """WORLD_SIZE unset: the hooks are no-ops and no process group is made."""
    from compressor.pipeline import distributed

    monkeypatch.setattr(distributed, "_dist", lambda: pytest.fail("torch.distributed used in one process"))
    assert not distributed.active() and distributed.is_writer()
    batches = torch.arange(12).reshape(4, 3)
    assert distributed.shard(batches) is batches
    assert distributed.pieces([8, 3], 4) == [[(0, 0, 4)], [(0, 4, 8)], [(1, 0, 3)]]
    assert distributed.owners({"a": ["a"], "b": ["b", "c"]}, {n: torch.nn.Linear(4, 8) for n in "abc"}, 2) == \
        {"b": 0, "a": 1}


def test_collective_timeout_must_be_positive(tmp_path):
    from click.testing import CliRunner

    from compressor.cli import app

    result = CliRunner().invoke(app, ["compress", "x", "-o", str(tmp_path / "o"), "-r", "svd-llm-20",
                                      "--collective-timeout", "-1"])
    assert result.exit_code == 2
    assert "--collective-timeout must be a positive number of seconds" in result.output
    assert not list(tmp_path.iterdir())
