"""One training process per run directory: the launching process (global rank 0) holds an exclusive `flock` on
`<run>/.lock` for the whole run. The kernel releases it when that process ends, however it ends, so a lock left by
a dead process never blocks a relaunch; its holder record (pid, host, start time) is reported as stale then."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import time

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
"""Launcher variables (torchrun, Lightning's launcher, SLURM) of which any non-zero one means "not global rank 0"."""


class RunDirectoryBusy(RuntimeError):
    """Another live process trains in this run directory."""


def launches_as_global_rank_zero() -> bool:
    """Whether this process is (or, before Lightning starts the others, will be) global rank 0."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in RANK_VARIABLES)


def _describe(record: str) -> str:
    try:
        holder = json.loads(record)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder unknown"


class RunLock:
    """An exclusive lock on a run directory, held until `release()` or the end of the process."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; raises RunDirectoryBusy naming the holder when a live process has it."""
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            record = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirectoryBusy(
                    f"{self.run_dir} is in use by another training process ({_describe(record)}; lock "
                    f"{self.path}). Two runs in one directory would mix their metrics and delete each other's "
                    f"checkpoints: wait for it to end or stop it, or give this run another --name") from err
            log.warning("cannot lock %s (%s): this filesystem does not support flock, so a second run in the same "
                        "directory would not be detected", self.path, err)
            return self
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if stale:
            log.warning("%s: taking over the stale lock of %s, which is no longer running (it ended without "
                        "releasing it, e.g. killed)", self.run_dir, _describe(stale))
        record = json.dumps({"pid": os.getpid(), "host": platform.node(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder record and unlock (a clean exit leaves no stale record)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_run_directory(run_dir: str) -> RunLock | None:
    """Lock the run directory from global rank 0 (the other ranks run inside its job); None on the others."""
    return RunLock(run_dir).acquire() if launches_as_global_rank_zero() else None
