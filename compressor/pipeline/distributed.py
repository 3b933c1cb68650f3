"""Several processes on one compression (`torchrun --nproc-per-node N -m compressor compress …`): every
torch.distributed call of lrc lives here; the pipeline's steps call the functions below, which do nothing in one
process (WORLD_SIZE unset or 1: torch.distributed is never touched, results are exactly one process's).

Lifecycle under torchrun (WORLD_SIZE > 1):
  1. the CLI's `session()` reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK), pins cuda:LOCAL_RANK,
     sets the collective timeout and turns a collective's failure (or the launcher's SIGTERM once another process
     died) into one line on stderr and a non-zero exit; the api edge checks every input before anything collective;
  2. every rank loads the same model and walks the same layers; `shard` gives each the contiguous share of the
     calibration windows it calibrates and propagates (`init` makes the process group on first use: gloo on CPU,
     NCCL on CUDA);
  3. statistics are sums over tokens: `all_reduce_stats` sums each layer's (and group's) before any
     decomposition, `all_reduce_sums` the Fisher pass's (whole chunks per rank: its mini-batch Fisher depends on
     the chunks); planning sees the same sums, so every rank gets the same plan;
  4. `compress_layer` assigns a layer's groups (the targets sharing an input) to owner ranks by greedy bin-packing
     (LPT) on m·n·min(m, n); each owner decomposes its groups and broadcasts the modules and their report lines;
     every rank swaps in the same modules;
  5. block refinement steps over the one-process run's pieces of windows (`pieces`): each rank backpropagates its
     windows of a piece, `sum_gradients` sums the gradients (the loss is a sum over windows normalised by the
     global norm, so the sum is the one-process gradient) and every rank takes the same Adam step;
  6. rank 0 alone writes the journal (`distributed_journal.ShardedJournal`: hidden states gathered in the
     one-process layout, so any world size resumes it), the output and the report; the others write nothing and
     wait at the end (`session`).
"""

from __future__ import annotations

import copy
import datetime
import os
import signal
import sys
from contextlib import contextmanager

import torch

from compressor.errors import UserError

DEFAULT_TIMEOUT = 600.0  # seconds a collective waits for the other processes (--collective-timeout)


class CollectiveFailure(RuntimeError):
    """Another process stopped (died, raised, or was too slow): this one ends too."""


class _World:
    """The launcher's view of this process (read from its environment once) and the process group's settings."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0) if self.size > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0) if self.size > 1 else 0
        self.timeout = DEFAULT_TIMEOUT
        self.cuda = False  # NCCL on cuda:LOCAL_RANK (set by `session` for --device cuda)
        self.chunk = 8  # windows per calibration call of the runner (`set_chunk`)
        self.windows = 0  # calibration windows of all ranks (`shard`)


_world = _World()


def world_size() -> int:
    return _world.size


def rank() -> int:
    return _world.rank


def is_writer() -> bool:
    """The process that writes the output, the report and the journal: rank 0 (the only one without torchrun)."""
    return _world.rank == 0


def active() -> bool:
    return _world.size > 1


def _dist():
    import torch.distributed as dist

    return dist


def init() -> None:
    """The process group, made once (every rank gets here at the same step of the same run)."""
    if not active():
        return
    dist = _dist()
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() and _world.cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_world.timeout))
    except Exception as exc:  # noqa: BLE001 (rendezvous errors come in many types)
        raise CollectiveFailure(f"could not join the {_world.size} processes: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _collective(fn, *args, **kwargs):
    init()
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 (gloo and NCCL raise RuntimeError, DistBackendError, DistError …)
        raise CollectiveFailure(
            f"process {_world.rank} of {_world.size}: another process stopped or did not answer within the "
            f"{_world.timeout:g} s --collective-timeout ({_short(exc)})") from None


def _stopped_by_launcher(signum, frame):
    raise CollectiveFailure(f"process {_world.rank} of {_world.size} stopped by the launcher (another process "
                            "failed)")


@contextmanager
def session(*, timeout: float | None = None, device: str = "cpu"):
    """Around one CLI command: pins the GPU of this process, sets the collective timeout, waits for every process
    at the end (rank 0 writes last), and prints a collective's failure as one line (exit code 1)."""
    if timeout is not None and not timeout > 0:
        raise UserError(f"--collective-timeout must be a positive number of seconds, got {timeout:g}")
    if not active():
        yield
        return
    if timeout is not None:
        _world.timeout = float(timeout)
    if device.startswith("cuda"):
        if device != "cuda":
            raise UserError(f"under torchrun every process takes the GPU of its LOCAL_RANK: pass --device cuda, "
                            f"not {device}")
        _world.cuda = True
        torch.cuda.set_device(_world.local_rank)
    previous = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    try:
        yield
        barrier()
    except CollectiveFailure as exc:
        hint = getattr(exc, "lrc_hint", None)
        print(f"error: {exc}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        sys.exit(1)
    except UserError as exc:
        if not getattr(exc, "every_rank", False):
            raise
        # Every rank refuses alike: each says so before any exits, or the launcher stops the slower ones
        # (SIGTERM, exit 1) as soon as the first is gone.
        print(f"error: {exc}", file=sys.stderr, flush=True)
        try:
            barrier()
        except CollectiveFailure:
            pass  # a rank already gone: it said its line or was stopped; this one has said its own
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist = _dist()
        if dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    if active():
        _collective(_dist().barrier)


# --- calibration windows -------------------------------------------------------------------------------------

def shard(batches: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (every window in one process)."""
    if not active():
        return batches
    n = _world.windows = batches.shape[0]
    if n < _world.size:
        _refuse_on_every_rank(n)
    return batches.tensor_split(_world.size)[_world.rank]


def _refuse_on_every_rank(n_windows: int):
    exc = UserError(f"{n_windows} calibration windows for {_world.size} processes: every process needs at least "
                    "one (raise --nsamples or start fewer processes)")
    exc.every_rank = True  # session() lets each rank print it before any exits
    raise exc


def _bounds(n: int) -> list[tuple[int, int]]:
    """[start, stop) of every rank's windows, as `shard` cuts them."""
    sizes = [len(part) for part in torch.arange(n).tensor_split(_world.size)]
    starts = [sum(sizes[:r]) for r in range(_world.size)]
    return [(s, s + k) for s, k in zip(starts, sizes)]


def my_chunks(n: int, batch_size: int) -> list[int]:
    """Starts of the chunks of `batch_size` windows (of n) this rank runs: whole chunks, split contiguously."""
    starts = list(range(0, n, batch_size))
    if not active():
        return starts
    return [int(s) for s in torch.tensor(starts, dtype=torch.long).tensor_split(_world.size)[_world.rank]]


# --- sums ----------------------------------------------------------------------------------------------------

def all_reduce_sums(tensors) -> None:
    """Sum each tensor over the ranks, in place."""
    if not active():
        return
    dist = _dist()
    for t in tensors:
        _collective(dist.all_reduce, t, op=dist.ReduceOp.SUM)


def all_reduce_stats(stats: dict) -> None:
    """Every Stats of a collector summed over the ranks (counts, Grams, cross terms, absolute sums)."""
    if not active():
        return
    for name in sorted(stats):
        s = stats[name]
        fields = [s.gram, s.abs_sum, None if s.cross is s.gram else s.cross]
        present = [t for t in fields if t is not None]
        device = present[0].device if present else ("cuda" if _world.cuda else "cpu")
        count = torch.tensor([s.count], dtype=torch.float64, device=device)
        all_reduce_sums([count, *present])
        s.count = int(count.item())


def all_reduce_scalar(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if _world.cuda else "cpu")
    all_reduce_sums([t])
    return float(t.item())


# --- decompositions ------------------------------------------------------------------------------------------

def owners(groups: dict[str, list[str]], targets: dict, size: int) -> dict[str, int]:
    """Owner rank of each group: greedy bin-packing, the costliest solve first to the least loaded rank (LPT)."""
    def cost(names):
        return sum(m * n * min(m, n) for m, n in (targets[x].weight.shape for x in names))

    load = [0] * size
    out = {}
    for owner in sorted(groups, key=lambda g: -cost(groups[g])):  # (sorted is stable: ties in the layer's order)
        r = min(range(size), key=lambda i: load[i])
        out[owner] = r
        load[r] += cost(groups[owner])
    return out


def compress_layer(compress, model, targets, groups, stats, *args, **kwargs):
    """`compress` (apply.compress_layer) with each group decomposed by its owner rank and broadcast to the others;
    the report lines in the one-process order."""
    if not active():
        return compress(model, targets, groups, stats, *args, **kwargs)
    owner_of = owners(groups, targets, _world.size)
    made = {}
    for owner, names in groups.items():
        if owner_of[owner] == _world.rank:
            reports = compress(model, targets, {owner: names}, stats, *args, **kwargs)
            modules = {r.name: _portable(model.get_submodule(r.name)) for r in reports if r.compressed}
            made[owner] = (reports, modules)
    from compressor.pipeline.targets import set_submodule

    dist = _dist()
    everyone = dict(made)
    for source in range(_world.size):
        box = [made if source == _world.rank else None]
        _collective(dist.broadcast_object_list, box, src=source)
        if source == _world.rank:
            continue
        for owner, (reports, modules) in box[0].items():
            everyone[owner] = (reports, modules)
            for name, module in modules.items():
                linear = targets[name]
                set_submodule(model, name, module.to(linear.weight.device))
                linear.to("meta")  # (as compress_layer does: the dense weight is dead from here on)
            stats[owner].release()
    return [r for owner in groups for r in everyone[owner][0]]


def _portable(module):
    """A copy on the CPU (pickled by the broadcast; each rank moves it to its own device)."""
    return module if not any(t.is_cuda for t in module.state_dict().values()) else copy.deepcopy(module).cpu()


# --- block refinement ----------------------------------------------------------------------------------------

def pieces(sizes: list[int], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """The refinement's steps: per step, the [(call, start, stop)] windows of this rank's calls (of `sizes`
    windows each) it runs. One process: every call cut into pieces of `batch_size` windows. Several: the same
    pieces of all windows (the calls being the one-process run's chunks of `_world.chunk` windows), each rank
    holding its windows of each (possibly none)."""
    if not active():
        return [[(k, s, min(s + batch_size, size))] for k, size in enumerate(sizes)
                for s in range(0, size, batch_size)]
    chunk, n = _world.chunk, _world.windows
    lo, _ = _bounds(n)[_world.rank]
    local = []  # [global start, global stop) of each of this rank's calls
    at = lo
    for size in sizes:
        local.append((at, at + size))
        at += size
    steps = []
    for c in range(0, n, chunk):
        end = min(c + chunk, n)
        for a in range(c, end, batch_size):
            b = min(a + batch_size, end)
            parts = [(k, max(a, s) - s, min(b, e) - s) for k, (s, e) in enumerate(local) if max(a, s) < min(b, e)]
            steps.append(parts)
    return steps


def sum_gradients(params) -> None:
    """Every parameter's gradient summed over the ranks (a rank without windows in the step adds zeros)."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sums([p.grad for p in params])


def broadcast_parameters(params) -> None:
    """Rank 0's values everywhere (guards the ranks' copies against drifting apart in the last bit)."""
    if not active():
        return
    dist = _dist()
    with torch.no_grad():
        for p in params:
            _collective(dist.broadcast, p.data, src=0)


def set_chunk(batch_size: int) -> None:
    """The runner's calibration chunk (windows per call), which the journal and refinement lay windows out by."""
    _world.chunk = batch_size
