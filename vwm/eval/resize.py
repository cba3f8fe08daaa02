"""Image resizing exactly as the reference feature extractors' pipelines do it (the resize changes FID / FVD).

- `tf1`: TensorFlow 1.x `resize_bilinear(align_corners=False)`, the resize of the original TF Inception FID
  graph and of torch-fidelity / torchmetrics `FrechetInceptionDistance` (what Vista's FID used): source
  coordinate = output index * (in / out), no half-pixel offset, no antialiasing.
- `bilinear`: PyTorch `F.interpolate(mode="bilinear", align_corners=False)` (half-pixel centres, no
  antialiasing): pytorch-fid and the LVDM / VideoGPT / TATS FVD preprocessing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ResizeMode = Literal["tf1", "bilinear"]
RESIZE_MODES: tuple[str, ...] = ("tf1", "bilinear")


def _tf1_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear interpolation along `dim` at source coordinates i * in / out (TF1, align_corners=False)."""
    n = x.shape[dim]
    if n == size:
        return x
    src = torch.arange(size, dtype=torch.float64, device=x.device) * (n / size)
    lo = src.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (src - lo.double()).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = size
    frac = frac.view(shape)
    return x.index_select(dim, lo) * (1 - frac) + x.index_select(dim, hi) * frac


def resize_images(x: torch.Tensor, size: tuple[int, int], mode: ResizeMode) -> torch.Tensor:
    """Resize float images (N, C, H, W) to `size` = (height, width) with the given convention."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"resize_images: expected float images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if mode == "tf1":
        return _tf1_axis(_tf1_axis(x, size[0], 2), size[1], 3)
    if mode == "bilinear":
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    raise ValueError(f"resize mode={mode!r} is invalid; allowed: {', '.join(RESIZE_MODES)}")
