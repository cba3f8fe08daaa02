"""Peak signal-to-noise ratio of generated frames against the true frames (where the truth is known exactly,
as in the toy world): PSNR = 10 log10(255^2 / MSE) per frame, MSE over all pixels and channels of uint8 RGB."""

from __future__ import annotations

import numpy as np
import torch

MAX_PSNR_DB = 100.0
"""PSNR of identical frames (MSE 0) is reported as this cap instead of infinity."""


def psnr_per_frame(generated: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> np.ndarray:
    """PSNR in dB of each frame: two uint8 videos of the same shape (T, ...)."""
    a = generated.numpy() if isinstance(generated, torch.Tensor) else np.asarray(generated)
    b = truth.numpy() if isinstance(truth, torch.Tensor) else np.asarray(truth)
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"psnr_per_frame: expected two uint8 videos of one shape, got {a.dtype} {a.shape} and "
                         f"{b.dtype} {b.shape}")
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.minimum(10.0 * np.log10(255.0 ** 2 / mse), MAX_PSNR_DB)
