"""The resumable per-rank stream of clip keys: a cursor (epoch, stream position) shared by all ranks, and the
DataLoader whose state is that cursor (so a resumed run, on any number of processes, continues the stream)."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

EXIT_TERMINATED = 128 + signal.SIGTERM
"""Exit code of a worker its training process terminated."""


class ClipSampler(DistributedSampler):
    """Per-rank stream of (epoch, position) keys. A cursor (epoch, position) says how many stream positions of the
    epoch all ranks together consumed; from it rank r takes positions position + k * world_size + r, padded to
    whole batches (every rank runs the same number of steps). The cursor is the same for any world size, so a run
    resumed on another number of processes continues the stream where it stopped. An iteration runs to the end of
    that epoch. With `consumption_tracked` (a trainer marks the batches its steps receive) only that moves the
    cursor: DataLoader workers draw indices ahead, and an epoch the trainer ends early (its batch count restored
    from a run on more ranks, `limit_train_batches`) must not be skipped because its last indices were drawn.
    Otherwise drawing an epoch to its end moves the cursor to the next one. A DistributedSampler subclass so
    Lightning keeps it instead of wrapping it in its own."""

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int, batch_size: int, seed: int,
                 start_epoch: int = 0, start_position: int = 0, consumption_tracked: bool = False):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.batches_per_epoch = math.ceil(self.num_samples / batch_size)
        self.num_samples = self.batches_per_epoch * batch_size
        self.total_size = self.num_samples * world_size
        self.consumption_tracked = consumption_tracked
        self.set_start(start_epoch, start_position)

    def set_start(self, epoch: int, position: int) -> None:
        """Move the cursor: the next iteration starts at stream position `position` of `epoch` (a position at or
        past the epoch's end is the start of the next epoch)."""
        if position >= len(self.dataset):
            epoch, position = epoch + 1, 0
        self.start_epoch, self.start_position, self.epoch = epoch, position, epoch

    def remaining(self) -> int:
        """Samples this rank draws from the cursor to the end of its epoch (whole batches)."""
        left = math.ceil((len(self.dataset) - self.start_position) / self.num_replicas)
        return math.ceil(left / self.batch_size) * self.batch_size

    def mark_consumed(self, epoch: int, position: int) -> None:
        """Move the cursor after the batch whose last sample on this rank is (epoch, position): every rank
        consumed the stream up to that sample's row of `world_size` positions."""
        self.set_start(epoch, position - self.rank + self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the cursor, not the trainer's epoch counter, fixes which data comes next, so a resumed run
        continues the same stream even where the trainer counts epochs differently after a restore."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.start_epoch, self.start_position
        for k in range(self.remaining()):
            yield epoch, start + k * self.num_replicas + self.rank
        if not self.consumption_tracked:
            self.set_start(epoch + 1, 0)

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable: its state is the data position, restored into the
    ClipSampler before the first batch is drawn (this also silences Lightning's mid-epoch resume warning)."""

    def __init__(self, *args: Any, position_fn: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.position_fn = position_fn

    def state_dict(self) -> dict[str, int]:
        """The (epoch, stream positions consumed) data position reported by the DataModule."""
        epoch, position = self.position_fn()
        return {"epoch": epoch, "position": position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Start the sampler at a saved position. A state written before the cursor counted stream positions
        ({epoch, batches_consumed}) is left to the DataModule's own state, which Lightning restores first and
        which knows the world size it was saved with."""
        if "position" in state_dict:
            self.sampler.set_start(state_dict["epoch"], state_dict["position"])


WORKER_START_METHODS = (None, "fork", "spawn")
"""How DataLoader workers start (`data.params.worker_start`). None is the platform's default: fork on Linux, fast
(the dataset index is shared copy-on-write) but a process that forks while other threads hold locks (gloo, NCCL,
a pin-memory thread) can, rarely, leave a worker deadlocked before its first batch. spawn starts each worker as a
fresh interpreter (a few seconds more per worker, once, with persistent workers) and has no such hazard.
forkserver is not offered: its server process belongs to the job's process group, dies with a scheduler's
SIGTERM, and the workers forked from it then exit, which ends the run before it saves."""


def worker_init(worker_id: int) -> None:
    """DataLoader worker setup: one intra-op thread, preemption signals left to the training process."""
    torch.set_num_threads(1)
    _ignore_preemption_signals()


def _ignore_preemption_signals() -> None:
    """Let this DataLoader worker outlive SIGTERM and SIGUSR1 sent to the whole job (schedulers signal every
    process; torch's worker handler would let SIGTERM kill it, and the run with it, before the trainer saves at
    the next step), while its own training process can still stop it with SIGTERM (torch's `terminate()` of a
    worker that does not exit, multiprocessing's at exit). The signals are blocked in every thread of the worker
    and a daemon thread takes them with `sigwaitinfo`, which names the sender (Linux; elsewhere torch's default)."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = getattr(multiprocessing.parent_process(), "pid", None) or os.getppid()  # the process that started us
    signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # threads started later inherit the mask

    def take_signals() -> None:
        while True:
            info = signal.sigwaitinfo(signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(EXIT_TERMINATED)

    threading.Thread(target=take_signals, name="vwm-worker-signals", daemon=True).start()
