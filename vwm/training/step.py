"""One training step, top to bottom.

Where each part runs (Lightning calls the hooks in this order for every micro-batch):

 1. data: a DataLoader worker draws clips (`vwm.data.sources.MultiSourceClips`), `ClipCollator` stacks them into
    the batch contract (vwm/data/batch.py), frames uint8.
 2. `VideoDataModule.on_before_batch_transfer`: the batch gets `data_position` (epoch, stream position of its
    first clip), which the resumable sampler also records as consumed.
 3. `VideoDataModule.on_after_batch_transfer`: `finalize_batch` turns the frames into [-1, 1] floats on the device.
 4. `DiffusionEngine.training_step` -> `step_keys` + `DiffusionEngine.make_generator`: ONE generator, seeded from
    (seed, rank, global step, data position), for every random draw of the step, then `diffusion_loss` below:
      a. `add_condition_frames`: cond_frames = frame 0 + cond_aug · noise,
      b. the conditioner: embeddings, classifier-free dropout per sample and embedder,
      c. latents: the cached ones, a posterior sample of cached moments, or the VAE encoding,
      d. the loss (vwm/diffusion/loss.py): sigma per clip, noise, condition-frame choice, the weighted error.
    The engine records a non-finite loss and the skipped-sample count, and logs the loss.
 5. `DiffusionEngine.on_before_optimizer_step` -> `vwm.training.guards.check_update`: all ranks agree the loss,
    gradient norm and learning rate are finite before any update.
 6. `DiffusionEngine.optimizer_step`: the update, then the EMA once per applied update.
 7. callbacks (`on_train_batch_end`): `CheckpointEvery` (commit protocol, signals), metrics file, throughput.
    When due, the video logger and the in-training evaluation sample with generators of their own (seeded by
    the step, resp. the evaluation seed); they draw nothing from the step's generator or the global RNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from vwm.diffusion.loss import DiffusionLossOutput

if TYPE_CHECKING:  # the engine calls into this module
    from vwm.models.engine import DiffusionEngine


def step_keys(global_step: int, batch: Mapping[str, object], batch_idx: int) -> tuple[int, ...]:
    """The integers (after seed and rank) that seed a step's generator: the global step and the data position
    (epoch, stream position) the DataModule tracks, which a resumed run restores exactly, unlike Lightning's
    batch_idx (it restarts differently after a stop on an epoch's last batch); batch_idx without a position."""
    position = batch.get("data_position")
    return (global_step, *position) if position is not None else (global_step, batch_idx)


def add_condition_frames(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`cond_frames` = `cond_frames_without_noise` + cond_aug · N(0, I) per clip (the reference's noise
    augmentation of the condition frame). Draws from `generator` only when some cond_aug is non-zero, so a run
    without augmentation draws exactly what it drew before this step existed. A batch that already holds
    `cond_frames` (one built by the caller, as the reference's datasets build it) is used as it is."""
    if "cond_frames_without_noise" not in batch or "cond_frames" in batch:
        return batch
    first = batch["cond_frames_without_noise"]
    cond_aug = batch.get("cond_aug")
    if cond_aug is None or not bool((cond_aug != 0).any()):
        batch["cond_frames"] = first.clone()
        return batch
    noise = torch.randn(first.shape, generator=generator, device=generator.device, dtype=first.dtype)
    scale = cond_aug.to(first.device, first.dtype).view(-1, *([1] * (first.ndim - 1)))
    batch["cond_frames"] = first + scale * noise.to(first.device)
    return batch


def diffusion_loss(engine: DiffusionEngine, batch: dict[str, torch.Tensor],
                   generator: torch.Generator) -> DiffusionLossOutput:
    """The loss terms of one batch, every random draw from `generator` (steps 4a-4d of the module docstring)."""
    if engine.loss_fn is None:
        raise ValueError("the model config has no loss_fn_config: it cannot be trained")
    batch = add_condition_frames(dict(batch), generator)
    # Conditioning before the latents: its CLIP preprocessing waits for the GPU (small host-to-device tensors),
    # which is cheap while the queue is short, before the VAE encode and the UNet are queued behind it.
    cond = engine.conditioner(batch, generator=generator)
    z = engine.latents_of(batch, generator)
    return engine.loss_fn(engine.model, engine.denoiser, cond, z, generator=generator)
