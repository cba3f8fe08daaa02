"""Checkpoints that are either complete or ignored, saved every N optimizer steps, on signals and at the end.

Protocol: every rank writes into `checkpoints/.step-N.partial/` (a fresh directory, never an overwrite); after the
barrier rank 0 writes `MANIFEST.json` (step, strategy format, world size, every file with its size), fsyncs it and
renames the directory to `checkpoints/step-N/`. Discovery accepts only directories whose manifest matches the files
on disk, so a save killed at any point (or a later-truncated shard) is never resumed from. Older checkpoints are
deleted only after the new one is committed.

SIGTERM and SIGUSR1 only set a flag; at the next step boundary the ranks agree (all-reduce) and all save, then the
run stops and the CLI exits non-zero (and asks SLURM to requeue on SIGUSR1 when running under SLURM).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.strategies import DeepSpeedStrategy

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_with_sizes(root: str) -> dict[str, int]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name == MANIFEST:
                continue
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


def write_manifest(root: str, info: dict[str, Any]) -> None:
    """Record every file of a checkpoint directory with its size, atomically (tmp, fsync, rename)."""
    manifest = {**info, "files": _files_with_sizes(root)}
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MANIFEST))
    _fsync_dir(root)


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of a committed checkpoint; raises ValueError naming what does not match the disk."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{root}: no {MANIFEST} (incomplete save)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from err
    for rel, size in manifest.get("files", {}).items():
        file = os.path.join(root, rel)
        if not os.path.isfile(file):
            raise ValueError(f"{root}: file {rel} listed in the manifest is missing")
        if os.path.getsize(file) != size:
            raise ValueError(f"{root}: file {rel} has {os.path.getsize(file)} bytes, manifest says {size}")
    return manifest


def committed_checkpoints(dirpath: str) -> Iterator[tuple[int, str]]:
    """(step, path) of every step directory in `dirpath`, newest first (validity not checked)."""
    if not os.path.isdir(dirpath):
        return iter(())
    found = []
    for name in os.listdir(dirpath):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(dirpath, name)):
            found.append((int(m.group(1)), os.path.join(dirpath, name)))
    return iter(sorted(found, reverse=True))


def latest_checkpoint(dirpath: str) -> tuple[str, dict[str, Any]] | None:
    """Newest checkpoint whose manifest matches the disk, with its manifest; invalid ones are logged and skipped."""
    for _, path in committed_checkpoints(dirpath):
        try:
            return path, read_manifest(path)
        except ValueError as err:
            log.warning("skipping checkpoint %s", err)
    return None


def resume_target(path: str, manifest: dict[str, Any]) -> str:
    """What to pass to `Trainer.fit(ckpt_path=...)` for a committed checkpoint directory, after checking that every
    pickle in it opens with the restricted (weights-only) unpickler, since DeepSpeed's loader does not restrict."""
    from vwm.checkpoint import verify_zero_files, zero_tag_dir

    if manifest.get("format") == "deepspeed":
        ckpt_dir, tag = zero_tag_dir(path)
        verify_zero_files(os.path.join(ckpt_dir, tag))
        return path
    return os.path.join(path, "lightning.ckpt")


class CheckpointEvery(pl.Callback):
    """Commit-protocol checkpoints every `every_n_steps` optimizer steps, on SIGTERM/SIGUSR1 and at the end."""

    def __init__(self, dirpath: str, every_n_steps: int = 1000, keep_last: int = 3, info: dict[str, Any] | None = None):
        if every_n_steps < 1:
            raise ValueError(f"checkpoint every_n_steps={every_n_steps} must be >= 1")
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last={keep_last} must be >= 1")
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.info = dict(info or {})
        self.signal_received: int | None = None
        self.stopped_by_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._last_saved = -1
        self._seen_step = -1

    # ----------------------------------------------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_received = signum  # only a flag: collectives and I/O happen at the next step boundary

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its own handlers (which broadcast from inside the handler); ours replace them.
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._last_saved = self._seen_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_saved:
            self.save(trainer)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    # ----------------------------------------------------------------------------------------------- saving

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        stepped, self._seen_step = step != self._seen_step, step
        if not stepped:  # inside a gradient-accumulation window: only optimizer-step boundaries are saved
            return
        signalled = trainer.strategy.reduce_boolean_decision(self.signal_received is not None, all=False)
        if signalled:
            self.save(trainer)
            self.stopped_by_signal = self.signal_received or signal.SIGTERM
            trainer.should_stop = True
            log.warning("signal received: saved step %d and stopping", step)
        elif step % self.every_n_steps == 0:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> str:
        """Save the current state under the commit protocol and prune old checkpoints; returns the final path."""
        step = trainer.global_step
        final = os.path.join(self.dirpath, f"step-{step:09d}")
        partial = os.path.join(self.dirpath, f".step-{step:09d}.partial")
        deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)
        if trainer.is_global_zero:
            if os.path.isdir(partial):
                shutil.rmtree(partial)  # leftover of a save that was killed
            os.makedirs(partial if not deepspeed else self.dirpath, exist_ok=True)
        trainer.strategy.barrier("vwm_checkpoint_prepare")
        target = partial if deepspeed else os.path.join(partial, "lightning.ckpt")
        # Lightning's weights_only=False here means "write the full training state" (nothing is unpickled).
        trainer.save_checkpoint(target, weights_only=False)  # ends with a barrier: every rank's files are written
        if trainer.is_global_zero:
            write_manifest(partial, {
                **self.info,
                "step": step,
                "format": "deepspeed" if deepspeed else "lightning",
                "world_size": trainer.world_size,
            })
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.dirpath)
            self._prune(keep=final)
            log.info("checkpoint committed: %s", final)
        trainer.strategy.barrier("vwm_checkpoint_commit")
        self._last_saved = step
        return final

    def _prune(self, keep: str) -> None:
        for i, (_, path) in enumerate(committed_checkpoints(self.dirpath)):
            if i >= self.keep_last and path != keep:
                try:
                    shutil.rmtree(path)
                except OSError as err:  # a failed delete must not kill training
                    log.warning("could not delete old checkpoint %s: %s", path, err)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps}
