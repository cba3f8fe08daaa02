"""What every data subset returns, and how it reports a broken sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class BrokenSampleError(Exception):
    """A sample whose media cannot be read (corrupt/truncated image or video, missing file).

    The DataModule skips it, counts it and draws a deterministic replacement; it never retries the same
    sample forever. Raise it with the offending path so the log names it.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class Clip:
    """One training clip as a subset produces it, before batching."""

    frames: torch.Tensor
    """uint8 (T, 3, H, W), already centre-cropped and resized to the target size."""
    actions: dict[str, torch.Tensor] = field(default_factory=dict)
    """Available actions only: key in vwm.actions.ACTION_KEYS -> float32 (ACTION_FEATURES[key],), normalised
    as the reference does (trajectory metres, speed raw, angle / 780, goal / (1600, 900), command as float)."""
    source: str = ""
    """Human-readable origin (file path, scene token, seed) for logs and audits."""
    moments: torch.Tensor | None = None
    """From a latent cache (vwm.data.latents): VAE posterior moments [mean | logvar], unscaled, (T, 2C, h, w);
    `frames` then holds only the condition frame, uint8 (1, 3, H, W)."""
