"""Durable file writes: fsync, write-to-temporary-then-rename, and umask-honouring permissions. The one home of
these for checkpoints, exports, evaluation records and caches."""

from __future__ import annotations

import os


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's (entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` through `<path>.tmp-<pid>` in the same folder (fsynced) and an atomic rename, so a
    killed process leaves the old file or the new one, never a torn one; the temporary is removed on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def honour_umask(path: str) -> None:
    """Give a file the permissions a plain `open()` would (0666 minus the umask): safetensors creates its files
    0600, which other users of a shared checkpoint folder cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
