"""One run per output directory: an exclusive lock on `.OUT.lock` beside OUT, held for the whole run.

    with output_lock(Path("out")):      # a second `lrc compress -o out` now fails at once, naming this pid
        ...

The lock is an `fcntl.flock` on the file, so the kernel drops it when its holder dies (SIGKILL included): a lock
file left behind by a killed run is stale, not held, and the next run takes it over. The file holds the holder's
pid, for the refusal message. Removing the file at the end races with a run that opened it just before: a run
that got the lock checks that the path still names the file it locked, and starts over if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from compressor.errors import UserError


def lock_path(out) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out) -> Iterator[None]:
    """Hold the lock of `out` inside the block; UserError (one line, naming the other run's pid) when a live process
    holds it. Parent directories it had to create are removed again when they are left empty."""
    out = Path(out)
    created = _make_parents(out.parent)
    try:
        fd = _acquire(out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        try:
            os.unlink(lock_path(out))  # still held: nobody can take it between the unlink and the close
        except FileNotFoundError:
            pass
        os.close(fd)
        _remove_empty(created)


def lock_holder(out) -> int | None:
    """The pid of the live process holding `out`'s lock (this one included), or None when nobody holds it."""
    path = lock_path(out)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _pid_in(fd) or -1  # held, its pid not written yet: an unknown holder, never this process
        return None  # stale: a killed run's file, or one being removed
    finally:
        os.close(fd)  # drops the shared lock taken above, if any


def busy_error(out, pid: int) -> UserError:
    who = f"pid {pid}" if pid > 0 else "pid unknown"
    return UserError(f"another lrc run ({who}) is writing {out}; wait for it to finish or stop it "
                     f"(its lock is {lock_path(out)})")


def _acquire(out: Path) -> int:
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _pid_in(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise busy_error(out, pid or -1) from None
            raise UserError(f"cannot lock {path}: {exc.strerror or exc}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the previous holder removed it after we opened it: lock the file now at that path


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing  # deepest first


def _remove_empty(folders: list[Path]) -> None:
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return
