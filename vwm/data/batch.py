"""The batch contract between the data pipeline and the training step, and the clip conditioning constants that
training and sampling share.

The DataModule's batches end here, without any random draw (docs/architecture.md, "Batch contract"):
`img_seq` (B,T,3,H,W) in [-1,1] (or `latent_moments` from a latent cache), `cond_frames_without_noise` (B,3,H,W),
`cond_aug`, `fps_id`, `motion_bucket_id` (B,), the five actions with `action_mask`, `n_skipped`, `sample_id`. The
frames leave the loader as uint8 and `finalize_batch` makes them floats, exactly once: in the collator
(`convert_on_device=False`) or in the device hook (`True`). The noisy condition frame `cond_frames` is the
training step's business (`vwm.training.step.add_condition_frames`), drawn from the step's generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vwm.actions import ACTION_FEATURES, ACTION_KEYS
from vwm.data.video import to_unit_range

FPS_ID = 9
"""fps conditioning value (10 fps - 1), as in every Vista training clip."""
MOTION_BUCKET_ID = 127
"""Motion-bucket conditioning value, as in every Vista training clip."""


def finalize_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 frames -> the contract's [-1, 1] float32: `img_seq` and `cond_frames_without_noise` (frame 0); a
    latent-cache batch (no `img_seq`) has only its `cond_frames_without_noise` converted. Raises ValueError for
    a batch whose frames are not uint8 (converted twice, or not from a vwm loader)."""
    key = "img_seq" if "img_seq" in batch else "cond_frames_without_noise"
    if batch[key].dtype != torch.uint8:
        raise ValueError(f"batch[{key!r}] is {batch[key].dtype}; finalize_batch converts uint8 frames from the "
                         "loader, once")
    if key == "img_seq":
        video = to_unit_range(batch["img_seq"])
        batch["img_seq"] = video
        batch["cond_frames_without_noise"] = video[:, 0].clone()
    else:
        batch["cond_frames_without_noise"] = to_unit_range(batch["cond_frames_without_noise"])
    return batch


def action_batch(per_sample: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The contract's actions of per-sample action dicts (a collated batch, a sampling round): every action key
    (B, F) float32, zero where absent, and action_mask (B, 5)."""
    batch = {k: torch.zeros(len(per_sample), ACTION_FEATURES[k], dtype=torch.float32) for k in ACTION_KEYS}
    mask = torch.zeros(len(per_sample), len(ACTION_KEYS), dtype=torch.bool)
    for i, actions in enumerate(per_sample):
        for j, key in enumerate(ACTION_KEYS):
            if key in actions:
                batch[key][i] = actions[key].float()
                mask[i, j] = True
    batch["action_mask"] = mask
    return batch


class ClipCollator:
    """Stack dataset items into the batch contract (frames left uint8 unless `convert`); items from a latent
    cache give `latent_moments` (B,T,2C,h,w) and the condition frame instead of `img_seq`."""

    def __init__(self, *, convert: bool, cond_aug: float, fps_id: int, motion_bucket_id: int):
        self.convert = convert
        self.cond_aug = cond_aug
        self.fps_id = fps_id
        self.motion_bucket_id = motion_bucket_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        size = len(items)
        if "moments" in items[0]:
            batch: dict[str, torch.Tensor] = {
                "latent_moments": torch.stack([it["moments"] for it in items]),
                "cond_frames_without_noise": torch.stack([it["frames"][0] for it in items])}
        else:
            batch = {"img_seq": torch.stack([it["frames"] for it in items])}
        batch.update(action_batch([it["actions"] for it in items]))
        batch["n_skipped"] = torch.tensor([it["n_skipped"] for it in items], dtype=torch.long)
        batch["sample_id"] = torch.tensor([it["sample_id"] for it in items], dtype=torch.long)
        batch["cond_aug"] = torch.full((size,), self.cond_aug, dtype=torch.float32)
        batch["fps_id"] = torch.full((size,), float(self.fps_id), dtype=torch.float32)
        batch["motion_bucket_id"] = torch.full((size,), float(self.motion_bucket_id), dtype=torch.float32)
        return finalize_batch(batch) if self.convert else batch
