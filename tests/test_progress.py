"""Progress: on a terminal a rich bar with rate and ETA (evaluation in windows/s); off a terminal (CI, pipes, logs)
one plain flushed line per decoder layer and per evaluation chunk with the elapsed time, since rich prints
nothing there until the end. The subprocess side (a real `lrc compress --eval` piped) is in test_cli.py."""

from __future__ import annotations

import io
import re

import torch
from rich.console import Console

from compressor.pipeline import workflow
from compressor.report.perplexity import perplexity


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 16)

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.emb(input_ids)})


WINDOWS = torch.randint(0, 16, (10, 8), generator=torch.Generator().manual_seed(0))


def test_off_a_terminal_one_line_per_chunk_and_layer(monkeypatch, capsys):
    monkeypatch.setattr(workflow, "console", Console(file=io.StringIO(), force_terminal=False))
    with workflow.eval_progress("after") as progress:
        perplexity(_Tiny(), WINDOWS, batch_size=4, progress=progress)
    with workflow.layer_progress("svd-20: layers", 3) as advance:
        for index in range(3):
            advance(index)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "perplexity (after): windows 4/10", "perplexity (after): windows 8/10", "perplexity (after): windows 10/10",
        "svd-20: layers 1/3", "svd-20: layers 2/3", "svd-20: layers 3/3"]
    for line in lines:
        assert re.search(r", \d+s elapsed, ([\d.]+ (windows|layers)/s|[\d.]+ s/(window|layer))", line), line
    assert "eta" in lines[0] and "eta" not in lines[2]  # an estimate while there is something left


def test_on_a_terminal_a_bar_with_windows_per_second_and_eta(monkeypatch, capsys):
    screen = io.StringIO()
    monkeypatch.setattr(workflow, "console", Console(file=screen, force_terminal=True, width=120))
    with workflow.eval_progress("before") as progress:
        perplexity(_Tiny(), WINDOWS, batch_size=4, progress=progress)
    text = screen.getvalue()
    assert "perplexity (before)" in text and "windows/s" in text and "eta" in text, text
    assert capsys.readouterr().err == ""  # no plain lines on a terminal


def test_slow_steps_read_as_seconds_per_step():
    assert workflow._rate(2.5, "windows") == "2.50 windows/s"
    assert workflow._rate(0.05, "layers") == "20.0 s/layer"


def test_disabled_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(workflow, "console", Console(file=io.StringIO(), force_terminal=False))
    with workflow.eval_progress("x", enabled=False) as progress:
        assert progress is None
    with workflow.layer_progress("x", 2, enabled=False) as advance:
        assert advance is None
    assert capsys.readouterr().err == ""
