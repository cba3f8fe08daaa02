"""Checkpoints that are either complete or ignored, saved every N optimizer steps, on signals and at the end.

Protocol: every rank writes into `checkpoints/.step-N.partial/` (a fresh directory, never an overwrite), then fsyncs
and checksums (CRC-32) the files it wrote itself; after the barrier rank 0 writes `MANIFEST.json` (step, strategy
format, world size, every file with its size and checksum), fsyncs it and the directories and renames the directory
to `checkpoints/step-N/`. Discovery accepts only directories whose manifest matches the files on disk, byte for
byte, so a save killed at any point, a later-truncated shard or a flipped bit is never resumed from: the newest
intact checkpoint is used instead, with a warning. Older checkpoints are deleted only after the new one is
committed. A checkpoint whose weights or EMA hold NaN/Inf is never committed.

SIGTERM and SIGUSR1 only set a flag; at the next step boundary the ranks agree (all-reduce) and all save, then the
run stops and the CLI exits non-zero (and asks SLURM to requeue on SIGUSR1 when running under SLURM).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DeepSpeedStrategy

from vwm.checkpoint.errors import CheckpointError
from vwm.checkpoint.manifest import (
    checkpoint_files,
    read_manifest,
    seal_files,
    write_manifest,
)
from vwm.checkpoint.unpickle import verify_pickles
from vwm.checkpoint.zero import verify_zero_files, zero_tag_dir
from vwm.fsio import fsync_path
from vwm.training.guards import non_finite_tensors

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHARD_RANK = re.compile(r"zero_pp_rank_(\d+)_")
_NOT_PICKLES = ("latest",)
"""Files of a checkpoint directory, besides Python scripts, that no resume path unpickles (DeepSpeed reads
`latest` as text)."""


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


def latest_checkpoint(dirpath: str, checksums: bool = True) -> tuple[str, dict[str, Any]] | None:
    """Newest checkpoint whose manifest matches the disk (every checksum, unless `checksums` is False), with its
    manifest; damaged or incomplete ones are skipped with a warning naming the file."""
    skipped = []
    for _, path in committed_checkpoints(dirpath):
        try:
            manifest = read_manifest(path, checksums=checksums)
        except ValueError as err:
            log.warning("skipping checkpoint %s", err)
            skipped.append(os.path.basename(path))
            continue
        if skipped:
            log.warning("resuming from %s, the newest intact checkpoint (skipped %s)", os.path.basename(path),
                        ", ".join(skipped))
        return path, manifest
    return None


def resume_target(path: str, manifest: dict[str, Any], deepspeed: bool) -> str:
    """What to pass to `Trainer.fit(ckpt_path=...)` for a committed checkpoint directory. Every file any resume
    path could unpickle is first opened with the restricted (weights-only) unpickler, whatever the manifest says
    (DeepSpeed's own loader does not restrict); then the layout must be the one the run's strategy loads."""
    verify_pickles(path, skip=_NOT_PICKLES)
    wanted = "deepspeed" if deepspeed else "lightning"
    if manifest.get("format") != wanted:
        raise CheckpointError(
            f"{path}: a {manifest.get('format')!r} checkpoint, but this run's strategy resumes only {wanted!r} "
            f"ones (lightning.trainer.strategy deepspeed_stage_1/2 write 'deepspeed', ddp and auto 'lightning'); "
            f"resume with the strategy that wrote it")
    if deepspeed:
        ckpt_dir, tag = zero_tag_dir(path)
        verify_zero_files(os.path.join(ckpt_dir, tag))
        return path
    target = os.path.join(path, "lightning.ckpt")
    if not os.path.isfile(target):
        raise CheckpointError(f"{target}: missing or not a file (a 'lightning' checkpoint is one file)")
    return target


def _writer_rank(rel: str, world_size: int) -> int:
    """The rank that wrote a checkpoint file: DeepSpeed's optimizer shard of rank r, everything else rank 0."""
    m = _SHARD_RANK.search(os.path.basename(rel))
    rank = int(m.group(1)) if m else 0
    return rank if rank < world_size else 0


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


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
        self._refuse_non_finite(trainer, step)
        if trainer.is_global_zero:
            if os.path.isdir(partial):
                shutil.rmtree(partial)  # leftover of a save that was killed
            os.makedirs(partial if not deepspeed else self.dirpath, exist_ok=True)
        trainer.strategy.barrier("vwm_checkpoint_prepare")
        target = partial if deepspeed else os.path.join(partial, "lightning.ckpt")
        rank, world = trainer.global_rank, trainer.world_size
        try:
            # Lightning's weights_only=False here means "write the full training state" (nothing is unpickled).
            trainer.save_checkpoint(target, weights_only=False)  # ends with a barrier: every rank's files exist
            # Each rank fsyncs and checksums the files it wrote (in parallel, from its page cache).
            own = seal_files(partial, [f for f in checkpoint_files(partial) if _writer_rank(f, world) == rank])
        except OSError as err:
            raise self._write_error(err, step, partial) from err
        sealed = _gather_objects(own, world)
        if trainer.is_global_zero:
            info = {**self.info, "step": step, "format": "deepspeed" if deepspeed else "lightning",
                    "world_size": world}
            try:
                write_manifest(partial, info, files={rel: entry for part in sealed for rel, entry in part.items()})
            except OSError as err:
                raise self._write_error(err, step, partial) from err
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_path(self.dirpath)
            self._prune(keep=final)
            log.info("checkpoint committed: %s", final)
        trainer.strategy.barrier("vwm_checkpoint_commit")
        self._last_saved = step
        return final

    def _previous(self) -> str:
        newest = next(committed_checkpoints(self.dirpath), None)
        return os.path.basename(newest[1]) if newest else "(none yet)"

    def _refuse_non_finite(self, trainer: pl.Trainer, step: int) -> None:
        """Stop every rank, committing nothing, when any rank's weights, EMA or buffers hold NaN/Inf."""
        bad = non_finite_tensors(trainer.lightning_module)
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            where = "tensors of another rank"
            if bad:
                where = ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
            raise FloatingPointError(
                f"refusing to commit checkpoint step {step}: non-finite values in {where}. The previous checkpoint "
                f"{self._previous()} is kept; resume from it with --resume auto (lower the learning rate or check "
                f"the data of the last steps)")

    def _write_error(self, err: OSError, step: int, partial: str) -> OSError:
        """The OSError of a failed checkpoint write, saying which disk and that the previous checkpoint is intact."""
        previous = self._previous()
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(self.dirpath).free
            return OSError(err.errno, (
                f"no space left on the device holding {self.dirpath} ({free / 2**30:.2f} GiB free, "
                f"{os.strerror(err.errno)}) while writing checkpoint step {step}. The previous checkpoint "
                f"{previous} is intact; free space (or lower lightning.checkpoint.keep_last), remove {partial}, "
                f"then rerun with --resume auto"))
        return OSError(err.errno, f"writing checkpoint step {step} into {partial} failed ({err}); the previous "
                                  f"checkpoint {previous} is intact")

    def _prune(self, keep: str) -> None:
        for i, (_, path) in enumerate(committed_checkpoints(self.dirpath)):
            if i >= self.keep_last and path != keep:
                try:
                    shutil.rmtree(path)
                except OSError as err:  # a failed delete must not kill training
                    log.warning("could not delete old checkpoint %s: %s", path, err)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps}
