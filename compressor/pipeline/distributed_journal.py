"""The resume journal of a run under torchrun (compressor/pipeline/distributed.py, step 6): rank 0 alone writes it;
hidden states are gathered to rank 0 in the one-process layout, so any world size resumes it, and each rank takes
its share of the windows back."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from compressor.errors import UserError
from compressor.pipeline import distributed as d
from compressor.pipeline.journal import Resumed, fault


def sharded_journal(open_journal, n_windows: int):
    """`open_journal()` on rank 0 (its refusal, e.g. another run's journal, is raised on every rank), wrapped so
    that every rank takes part in what it keeps; the journal itself in one process."""
    if not d.active():
        return open_journal()
    if n_windows < d._world.size:  # (every rank refuses alike, before anything collective)
        d._refuse_on_every_rank(n_windows)
    journal, error = None, None
    if d.is_writer():
        try:
            journal = open_journal()
        except UserError as exc:
            error = str(exc)
    box = [error]
    d._collective(d._dist().broadcast_object_list, box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    return ShardedJournal(journal, n_windows)


class ShardedJournal:
    """The journal of a run under torchrun: rank 0's Journal (None elsewhere). Activations are gathered to rank 0
    and kept in the one-process layout (the windows in order, in chunks of the runner's batch size), so a run
    resumes with any number of processes; each rank takes its share back."""

    def __init__(self, journal, n_windows: int):
        self.journal, self.n = journal, n_windows
        self.folder = journal.folder if journal is not None else None

    @property
    def done(self) -> int:
        return self.journal.done if self.journal is not None else 0

    def kept_on_failure(self):
        return self.journal.kept_on_failure() if self.journal is not None else nullcontext(self)

    def resumed(self):
        dist = d._dist()
        chunk = d._world.chunk
        if self.journal is not None:
            r = self.journal.resumed()
            shares = [None] * d._world.size
            if r is not None:
                streams = [r.hidden, r.dense_hidden]
                cut = [[_windows(s, a, b, chunk) if s is not None else None for s in streams]
                       for a, b in d._bounds(self.n)]
                shares = [(r.done, r.state, c[0], c[1]) for c in cut]
        else:
            shares = None
        box = [None]
        d._collective(dist.scatter_object_list, box, shares, src=0)
        if box[0] is None:
            return None
        done, state, hidden, dense = box[0]
        return Resumed(done, hidden, dense, state)

    def layer_tensors(self, index: int, prefix: str):
        box = [self.journal.layer_tensors(index, prefix) if self.journal is not None else None]
        d._collective(d._dist().broadcast_object_list, box, src=0)
        return box[0]

    def record(self, done, hidden, dense_hidden, state, layer_tensors=None) -> None:
        dist = d._dist()
        mine = ([h.cpu() for h in hidden], None if dense_hidden is None else [h.cpu() for h in dense_hidden])
        gathered = [None] * d._world.size if self.journal is not None else None
        d._collective(dist.gather_object, mine, gathered, dst=0)
        if self.journal is None:
            fault(f"rank{d._world.rank}:after-layer:{done}")  # the crash tests' fault point of one rank
            return
        chunk = d._world.chunk
        streams = []
        for which in (0, 1):
            parts = [g[which] for g in gathered]
            streams.append(None if parts[0] is None else _rechunk([h for p in parts for h in p], chunk))
        self.journal.record(done, streams[0], streams[1], state, layer_tensors)

    def __getattr__(self, name):  # close_out, discard, layer_file …: rank 0's business
        journal = self.__dict__.get("journal")
        if journal is None:
            return lambda *a, **k: None
        return getattr(journal, name)


def _rechunk(tensors: list[torch.Tensor], chunk: int) -> list[torch.Tensor]:
    """Windows held in any chunks, in chunks of `chunk` windows (stand-ins of a finished run kept as they are)."""
    if not tensors or any(t.numel() == 0 for t in tensors):
        return tensors
    return list(torch.cat(tensors).split(chunk))


def _windows(stream: list[torch.Tensor], start: int, stop: int, chunk: int) -> list[torch.Tensor]:
    """Windows [start, stop) of a stream kept in one-process chunks, in chunks of `chunk`."""
    if any(t.numel() == 0 for t in stream):  # the last layer's stand-ins: only their count matters
        return [torch.empty(0) for _ in range(-(-(stop - start) // chunk))]
    return list(torch.cat(stream)[start:stop].split(chunk))
