"""MANIFEST.json of a committed checkpoint directory: written (sealed files, atomic) by the commit protocol of
`vwm.training.checkpointing`, read back by discovery and by every weight reader before it trusts the files."""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

from vwm.checkpoint.errors import CheckpointError
from vwm.fsio import atomic_write_text, fsync_path

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 2
"""Version 2 records {"bytes", "crc32"} per file; version 1 (sizes only) is still read."""


def file_crc32(path: str, chunk: int = 1 << 24) -> str:
    """CRC-32 (zlib's, as zip and gzip use) of a file's bytes, streamed in 16 MiB chunks, as 8 hex digits."""
    crc = 0
    view = memoryview(bytearray(chunk))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def checkpoint_files(root: str) -> list[str]:
    """Every file of a checkpoint directory (relative paths, sorted), the manifest excluded."""
    out = []
    for folder, _, files in os.walk(root):
        out.extend(os.path.relpath(os.path.join(folder, name), root) for name in files
                   if not (folder == root and name.startswith(MANIFEST)))
    return sorted(out)


def seal_files(root: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """fsync the given files of `root` and record {"bytes", "crc32"} for each."""
    out = {}
    for rel in names:
        path = os.path.join(root, rel)
        fsync_path(path)
        out[rel] = {"bytes": os.path.getsize(path), "crc32": file_crc32(path)}
    return out


def write_manifest(root: str, info: dict[str, Any], files: dict[str, dict[str, Any]] | None = None) -> None:
    """Record every file of a checkpoint directory with its size and CRC-32 (`files`: already sealed ones, else
    all files are sealed here), atomically (tmp, fsync, rename), then fsync the directories."""
    files = files if files is not None else seal_files(root, checkpoint_files(root))
    manifest = {**info, "manifest_version": MANIFEST_VERSION, "files": dict(sorted(files.items()))}
    atomic_write_text(os.path.join(root, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    for folder, _, _ in os.walk(root):
        fsync_path(folder)


def read_manifest(root: str, checksums: bool = False) -> dict[str, Any]:
    """The manifest of a committed checkpoint; raises ValueError naming what does not match the disk: a missing
    file, a size, or (with `checksums`, which reads every byte) a CRC-32."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{root}: no {MANIFEST} (incomplete save)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from err
    for rel, entry in manifest.get("files", {}).items():
        size, crc = (entry, None) if isinstance(entry, int) else (entry.get("bytes"), entry.get("crc32"))
        file = os.path.join(root, rel)
        if not os.path.isfile(file):
            raise ValueError(f"{root}: file {rel} listed in the manifest is missing")
        if os.path.getsize(file) != size:
            raise ValueError(f"{root}: file {rel} has {os.path.getsize(file)} bytes, manifest says {size}")
        if checksums and crc is not None and file_crc32(file) != crc:
            raise ValueError(f"{root}: file {rel}: content does not match its checksum (crc32 {file_crc32(file)}, "
                             f"manifest {crc}): the file was damaged after it was written")
    return manifest


def check_manifest(path: str) -> None:
    """Refuse a vwm checkpoint directory (or a file or DeepSpeed tag directory inside one) whose MANIFEST.json does
    not match the files on disk: missing files, sizes, checksums (every byte is read)."""
    root = os.path.abspath(path)
    for level in range(3):  # the directory itself, or the step-N/ above a file or DeepSpeed tag directory in it
        named_step = re.match(r"^step-\d+$", os.path.basename(root)) is not None
        if (level == 0 or named_step) and os.path.isfile(os.path.join(root, MANIFEST)):
            try:
                read_manifest(root, checksums=True)
            except ValueError as err:
                raise CheckpointError(str(err)) from err
            return
        root = os.path.dirname(root)
