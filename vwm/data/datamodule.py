"""VideoDataModule: training clips from weighted subsets (`vwm.data.sources.MultiSourceClips`) streamed per rank
(`vwm.data.stream`), resumable at any step on any number of ranks, and collated into the batch contract of
docs/architecture.md (`vwm.data.batch`). `Sampler` is the reference's name for the same class."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from vwm.config import REFERENCE_SUBSETS, to_container
from vwm.data.batch import FPS_ID, MOTION_BUCKET_ID, ClipCollator, finalize_batch
from vwm.data.sources import ClipSource, MultiSourceClips, Visibility, build_subset
from vwm.data.stream import WORKER_START_METHODS, ClipSampler, ResumableDataLoader, worker_init
from vwm.data.video import check_target_size
from vwm.defaults import NUM_FRAMES, TRAIN_HEIGHT, TRAIN_WIDTH

log = logging.getLogger(__name__)

STATE_VERSION = 2
"""Version 2 counts the data position in stream positions of all ranks (version 1: batches per rank)."""


class VideoDataModule(pl.LightningDataModule):
    """Training clips from weighted subsets (OpenDV-YouTube, nuScenes, ...) as contract batches, resumable."""

    config_unbuilt = ("subsets",)
    """The config layer passes `subsets` through unbuilt: their {target, params} nodes need the derived
    num_frames / target_height / target_width, which only the DataModule knows."""

    def __init__(self, batch_size: int, num_workers: int = 0, prefetch_factor: int = 2, shuffle: bool = True,
                 subsets: Sequence[str | Mapping[str, Any] | ClipSource] | None = None,
                 probs: Sequence[float] | None = None, samples_per_epoch: int | None = None,
                 target_height: int = TRAIN_HEIGHT, target_width: int = TRAIN_WIDTH, num_frames: int = NUM_FRAMES,
                 seed: int | None = None, action_visibility: Visibility = "rotate", pin_memory: bool = True,
                 persistent_workers: bool = True, timeout: float = 600.0, max_consecutive_failures: int = 16,
                 max_failure_fraction: float = 0.1, convert_on_device: bool = True, cond_aug: float = 0.0,
                 fps_id: int = FPS_ID, motion_bucket_id: int = MOTION_BUCKET_ID,
                 worker_start: str | None = None):
        super().__init__()
        subsets, probs = to_container(subsets), to_container(probs)
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("prefetch_factor", prefetch_factor, 1), ("num_frames", num_frames, 1),
                                 ("max_consecutive_failures", max_consecutive_failures, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        check_target_size(target_height, target_width)
        if not subsets or isinstance(subsets, (str, Mapping)):
            raise ValueError(f"subsets={subsets!r} must be a non-empty list of names "
                             f"{sorted(REFERENCE_SUBSETS)} or {{target, params}} mappings")
        if probs is not None:
            numbers = all(isinstance(p, (int, float)) and math.isfinite(p) and p >= 0 for p in probs)
            if len(probs) != len(subsets) or not numbers or sum(probs) <= 0:
                raise ValueError(f"probs={probs!r} must be {len(subsets)} non-negative numbers with a "
                                 "positive sum (one per subset), or null for proportional to subset sizes")
        if samples_per_epoch is not None and (
                not isinstance(samples_per_epoch, int) or samples_per_epoch < 1):
            raise ValueError(f"samples_per_epoch={samples_per_epoch!r} must be a positive integer or null")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed={seed!r} must be a non-negative integer or null (the trainer's seed)")
        if action_visibility not in ("rotate", "all"):
            raise ValueError(f"action_visibility={action_visibility!r} must be 'rotate' or 'all'")
        if not 0.0 <= max_failure_fraction <= 1.0:
            raise ValueError(f"max_failure_fraction={max_failure_fraction!r} must be in [0, 1]")
        if worker_start not in WORKER_START_METHODS:
            raise ValueError(f"worker_start={worker_start!r} must be one of {list(WORKER_START_METHODS)}")
        if not timeout >= 0 or not cond_aug >= 0:
            raise ValueError(f"timeout={timeout!r} and cond_aug={cond_aug!r} must be >= 0")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.shuffle = shuffle
        self.subset_specs = list(subsets)
        self.probs = None if probs is None else [float(p) for p in probs]
        self.samples_per_epoch = samples_per_epoch
        self.target_height = target_height
        self.target_width = target_width
        self.num_frames = num_frames
        self.seed = seed
        self.action_visibility = action_visibility
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.timeout = float(timeout)
        self.worker_start = worker_start
        self.max_consecutive_failures = max_consecutive_failures
        self.max_failure_fraction = float(max_failure_fraction)
        self.convert_on_device = convert_on_device
        self.cond_aug = float(cond_aug)
        self.fps_id = fps_id
        self.motion_bucket_id = motion_bucket_id
        self.dataset: MultiSourceClips | None = None
        self.rank, self.world_size = 0, 1
        self._position = (0, 0)
        self._pending_state: dict[str, Any] | None = None
        self._sampler: ClipSampler | None = None

    # ---------------------------------------------------------------- setup

    def setup(self, stage: str | None = None, *, rank: int | None = None,
              world_size: int | None = None) -> None:
        """Build the subsets (checking roots and annotation files) and fix this process's rank."""
        trainer = self.trainer
        if rank is not None or world_size is not None:
            self.rank, self.world_size = rank or 0, world_size or 1
        elif trainer is not None:
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside world_size={self.world_size}")
        if self.dataset is not None:
            return
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        subsets = [build_subset(spec, num_frames=self.num_frames, target_height=self.target_height,
                                target_width=self.target_width) for spec in self.subset_specs]
        names = [spec if isinstance(spec, str) else type(built).__name__
                 for spec, built in zip(self.subset_specs, subsets)]
        for name, subset in zip(names, subsets):
            if len(subset) == 0:
                raise ValueError(f"subset {name} has no clips")
        cached = [bool(getattr(s, "yields_moments", False)) for s in subsets]
        if any(cached) and not all(cached):
            raise ValueError(
                f"subsets mix latent caches {[n for n, c in zip(names, cached) if c]} with pixel sources "
                f"{[n for n, c in zip(names, cached) if not c]}; train from latent caches only (build one "
                "per source with `python -m vwm.data.latents build`) or from pixels only")
        model = getattr(trainer, "lightning_module", None)
        for subset in subsets:
            if model is not None and callable(getattr(subset, "check_model", None)):
                subset.check_model(model)
        sizes = [len(s) for s in subsets]
        probs = np.asarray(self.probs if self.probs is not None else sizes, dtype=np.float64)
        self.dataset = MultiSourceClips(
            subsets, (probs / probs.sum()).tolist(), self.samples_per_epoch or sum(sizes), seed=self.seed,
            shuffle=self.shuffle, visibility=self.action_visibility,
            max_consecutive_failures=self.max_consecutive_failures,
            max_failure_fraction=self.max_failure_fraction, names=names,
            frame_shape=(self.num_frames, 3, self.target_height, self.target_width))
        shares = probs / probs.sum()
        log.info("data: %s, %d samples per epoch", ", ".join(
            f"{n} {len(s)} clips p={p:.3f}" for n, s, p in zip(names, subsets, shares)), len(self.dataset))

    # ---------------------------------------------------------------- loaders

    def train_dataloader(self) -> ResumableDataLoader:
        """Training loader: a ClipSampler starting at the data position, ClipCollator batches."""
        if self.dataset is None:
            raise RuntimeError("VideoDataModule.setup() must run before train_dataloader()")
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        epoch, position = self.position()
        self._sampler = ClipSampler(self.dataset, rank=self.rank, world_size=self.world_size,
                                    batch_size=self.batch_size, seed=self.seed or 0, start_epoch=epoch,
                                    start_position=position,
                                    consumption_tracked=bool(self.trainer is not None and self.trainer.training))
        workers = self.num_workers > 0
        return ResumableDataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self._sampler, num_workers=self.num_workers,
            collate_fn=ClipCollator(convert=not self.convert_on_device, cond_aug=self.cond_aug,
                                    fps_id=self.fps_id, motion_bucket_id=self.motion_bucket_id),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=self.persistent_workers and workers, timeout=self.timeout if workers else 0.0,
            worker_init_fn=worker_init if workers else None, position_fn=self.position,
            multiprocessing_context=self.worker_start if workers else None)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Record that a training step receives this batch: the data position moves past it. The batch gets
        `data_position`, the (epoch, stream position) of its first clip as host ints, which seeds the step."""
        trainer = self.trainer
        if "sample_id" in batch:
            batch["data_position"] = tuple(batch["sample_id"][0, :2].tolist())
            if self._sampler is not None and trainer is not None and trainer.training:
                epoch, position = batch["sample_id"][-1, :2].tolist()
                self._sampler.mark_consumed(epoch, position)
        return batch

    def test_dataloader(self) -> ResumableDataLoader:
        """The reference's test pass (`--no_test false`) reuses the training stream."""
        return self.train_dataloader()

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int
                                ) -> dict[str, torch.Tensor]:
        """Convert uint8 frames to the contract's [-1, 1] floats on the training device (when the workers did not:
        `convert_on_device`)."""
        return finalize_batch(batch) if self.convert_on_device else batch

    # ---------------------------------------------------------------- resumability

    def set_position(self, epoch: int, position: int) -> None:
        """Set the data position: the first `position` stream positions of `epoch` (all ranks together) are
        done (for loops that do not run through Lightning's batch hooks)."""
        if epoch < 0 or position < 0:
            raise ValueError(f"epoch={epoch} and position={position} must be >= 0")
        self._position = (int(epoch), int(position))
        if self._sampler is not None:
            self._sampler.set_start(*self._position)

    def position(self) -> tuple[int, int]:
        """(epoch, stream positions consumed in it by all ranks): where the next training batch starts."""
        if self._sampler is not None:
            return self._sampler.start_epoch, self._sampler.start_position
        return self._position

    def _fingerprint(self) -> dict[str, Any]:
        assert self.dataset is not None
        return {"seed": self.seed, "batch_size": self.batch_size,
                "samples_per_epoch": self.dataset.samples_per_epoch, "shuffle": self.shuffle,
                "subset_sizes": [len(s) for s in self.dataset.subsets],
                "probs": np.diff(np.concatenate([[0.0], self.dataset._cum])).round(12).tolist()}

    def state_dict(self) -> dict[str, Any]:
        """Data position and the settings that fix the sample order (saved in Lightning checkpoints); the world
        size is recorded, not checked: the position counts the stream of all ranks together."""
        if self.dataset is None:
            return {}
        epoch, position = self.position()
        return {"version": STATE_VERSION, "epoch": epoch, "position": position, "world_size": self.world_size,
                **self._fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position; the next train_dataloader() continues exactly after the last batch, on any
        number of ranks. Version 1 states (per-rank batches consumed) are converted."""
        if not state_dict:
            return
        state = dict(state_dict)
        if state.get("version") == 1:  # cursor (epoch, batches consumed per rank) of a run on world_size ranks
            state["position"] = state.pop("batches_consumed") * state["batch_size"] * state["world_size"]
        elif state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION} (or 1)")
        self._pending_state = state
        if self.dataset is not None:
            self._restore(state)
            self._pending_state = None

    def _restore(self, state: dict[str, Any]) -> None:
        now = self._fingerprint()
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in now.items() if state.get(k) != v]
        if changed:
            raise ValueError("the data order changed since the checkpoint, so the run cannot resume exactly: "
                             + "; ".join(changed))
        if state.get("world_size") != self.world_size and self.rank == 0:
            log.info("data position: epoch %d, stream position %d, saved by %s rank(s), continued by %d",
                     state["epoch"], state["position"], state.get("world_size"), self.world_size)
        self.set_position(state["epoch"], state["position"])


Sampler = VideoDataModule
"""The reference's name (`vwm.data.dataset.Sampler`) for the DataModule."""
