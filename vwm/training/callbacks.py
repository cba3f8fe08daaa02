"""Training callbacks: throughput/MFU, a machine-readable metrics file, and the video logger."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import pytorch_lightning as pl
import torch

from vwm.media import frame_grid, side_by_side, to_uint8_frames, write_mp4
from vwm.training.flops import GIB, peak_tflops

log = logging.getLogger(__name__)


class ThroughputMonitor(pl.Callback):
    """Logs clips/s, latent tokens/s, model TFLOP/s, MFU and peak GPU memory every `log_every` optimizer steps.

    `train_flops_per_clip` is 3x the UNet forward FLOPs of one clip (counted once on the meta device); MFU is
    against the bf16 peak of the device (989 TFLOP/s for H100/H200).
    """

    def __init__(self, clips_per_step: int, latent_tokens_per_clip: int, train_flops_per_clip: float,
                 log_every: int = 10):
        self.clips_per_step = clips_per_step
        self.tokens_per_clip = latent_tokens_per_clip
        self.flops_per_clip = train_flops_per_clip
        self.log_every = max(1, log_every)
        self._t0: float | None = None
        self._step0 = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._t0 is None:
            self._t0, self._step0 = time.perf_counter(), step
            return
        if step - self._step0 < self.log_every:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0
        steps = step - self._step0
        clips_s = self.clips_per_step * steps / elapsed
        tflops = clips_s * self.flops_per_clip / 1e12
        world = max(1, trainer.world_size)
        metrics = {
            "perf/step_s": elapsed / steps,
            "perf/clips_per_s": clips_s,
            "perf/latent_tokens_per_s": clips_s * self.tokens_per_clip,
            "perf/model_tflops_per_s": tflops,
            "perf/mfu": tflops / (peak_tflops(pl_module.device) * world),
        }
        if torch.cuda.is_available():
            metrics["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / GIB
        pl_module.log("clips_s", metrics["perf/clips_per_s"], prog_bar=True, rank_zero_only=True)
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._t0, self._step0 = time.perf_counter(), step


class MetricsFile(pl.Callback):
    """Appends one JSON line per optimizer step (rank 0) with every logged scalar: `metrics.jsonl`."""

    def __init__(self, path: str):
        self.path = path
        self._seen = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._seen or not trainer.is_global_zero:
            self._seen = step
            return
        self._seen = step
        row = {"step": step}
        for key, value in trainer.callback_metrics.items():
            row[key] = float(value)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class VideoLogger(pl.Callback):
    """Every `batch_frequency` optimizer steps, samples clips (EMA weights when kept) conditioned like the batch and
    writes samples | ground truth | VAE reconstruction as mp4 and a frame-grid PNG (and to TensorBoard).

    Every rank samples its own batch so no rank waits for rank 0 at the next collective; rank 0 writes.
    `increase_log_steps` logs at steps 1, 2, 4, ... below the frequency. The reference `ImageLogger` knobs without
    effect here are dropped by vwm.aliases.PARAM_ALIASES.
    """

    def __init__(
        self,
        batch_frequency: int = 1000,
        max_clips: int = 1,
        disabled: bool = False,
        increase_log_steps: bool = True,
        log_first_step: bool = False,
        log_before_first_step: bool = False,
        fps: float = 10.0,
        out_dir: str | None = None,
    ):
        if batch_frequency < 1:
            raise ValueError(f"batch_frequency={batch_frequency} must be >= 1")
        self.batch_frequency = batch_frequency
        self.max_clips = max_clips
        self.disabled = disabled
        self.log_steps = [2**n for n in range(int(math.log2(batch_frequency)) + 1)] if increase_log_steps else []
        self.log_first_step = log_first_step or log_before_first_step
        self.fps = fps
        self.out_dir = out_dir
        self._seen = -1

    def _due(self, step: int) -> bool:
        if step == 0:
            return self.log_first_step
        return step % self.batch_frequency == 0 or step in self.log_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = trainer.global_step - 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.disabled or step == self._seen or not self._due(step):
            self._seen = step
            return
        self._seen = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            videos = pl_module.log_videos(batch, n=self.max_clips, seed=step)
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero:
            self._write(trainer, videos, step)

    def _write(self, trainer: pl.Trainer, videos: dict[str, torch.Tensor], step: int) -> None:
        out_dir = self.out_dir or os.path.join(trainer.default_root_dir, "videos")
        os.makedirs(out_dir, exist_ok=True)
        order = [k for k in ("samples", "inputs", "reconstructions") if k in videos]
        for i in range(videos["samples"].shape[0]):
            clips = [to_uint8_frames(videos[k][i]) for k in order]
            write_mp4(side_by_side(*clips), os.path.join(out_dir, f"step{step:08d}_clip{i}.mp4"), fps=self.fps)
            grid = frame_grid(clips)
            from PIL import Image

            Image.fromarray(grid).save(os.path.join(out_dir, f"step{step:08d}_clip{i}.png"))
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_image"):
                    experiment.add_image(f"videos/clip{i}", grid, step, dataformats="HWC")
        log.info("wrote %d sample video(s) for step %d to %s (rows: %s)", videos["samples"].shape[0], step, out_dir,
                 " | ".join(order))
