"""Classifier-free guidance (Ho & Salimans 2022): x = x_u + s·(x_c - x_u), with per-frame scales for video.

A guider only combines the two denoised estimates; the sampler's denoise closure
(`vwm.diffusion.sampler.make_denoise_fn`) batches the conditional and unconditional passes. `needs_uncond`
tells the closure whether the unconditional pass is needed at all.
"""

from __future__ import annotations

from typing import Literal

import torch


def _per_frame(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(T,) scales as a (1,T,1,...) tensor broadcastable against `like` (B,T,...)."""
    return scale.to(device=like.device, dtype=like.dtype).reshape(1, -1, *([1] * (like.ndim - 2)))


def _check_video(x_uncond: torch.Tensor, x_cond: torch.Tensor) -> None:
    if x_cond.ndim < 2 or x_uncond.shape != x_cond.shape:
        raise ValueError(
            f"guider: x_uncond and x_cond must share a (B,T,...) shape, got {tuple(x_uncond.shape)} "
            f"and {tuple(x_cond.shape)}"
        )


class IdentityGuider:
    """No guidance: returns the conditional estimate; the sampler skips the unconditional pass."""

    needs_uncond: bool = False

    def __call__(self, x_uncond: torch.Tensor | None, x_cond: torch.Tensor) -> torch.Tensor:
        """x_cond unchanged."""
        return x_cond


class VanillaCFG:
    """Classifier-free guidance with one scale for every frame: x_u + scale·(x_c - x_u)."""

    needs_uncond: bool = True

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, x_uncond: torch.Tensor, x_cond: torch.Tensor) -> torch.Tensor:
        """Guided estimate, same shape as the inputs."""
        _check_video(x_uncond, x_cond)
        return x_uncond + self.scale * (x_cond - x_uncond)


class LinearPredictionGuider:
    """CFG whose scale rises linearly over frames, linspace(min_scale, max_scale, T) (vista.md §1.7)."""

    needs_uncond: bool = True

    def __init__(self, max_scale: float = 2.5, min_scale: float = 1.0):
        self.max_scale = max_scale
        self.min_scale = min_scale

    def frame_scales(self, num_frames: int) -> torch.Tensor:
        """(T,) float32 guidance scale of each frame."""
        return torch.linspace(self.min_scale, self.max_scale, num_frames)

    def __call__(self, x_uncond: torch.Tensor, x_cond: torch.Tensor) -> torch.Tensor:
        """Guided estimate on (B,T,...) inputs with frame t scaled by frame_scales(T)[t]."""
        _check_video(x_uncond, x_cond)
        scale = _per_frame(self.frame_scales(x_cond.shape[1]), x_cond)
        return x_uncond + scale * (x_cond - x_uncond)


class TrianglePredictionGuider(LinearPredictionGuider):
    """CFG with a triangle wave of scales over frames: min_scale at both ends, max_scale mid-clip (§1.7).

    With f = linspace(0, 1, T) and period p, the wave is 2·|f/p - floor(f/p + 1/2)|; several periods are
    fused by mean, product or max before mapping [0, 1] to [min_scale, max_scale]. Low scales on the first
    and last frames keep CFG over-saturation from accumulating across autoregressive rounds.
    """

    def __init__(
        self,
        max_scale: float = 2.5,
        min_scale: float = 1.0,
        period: float | list[float] = 1.0,
        period_fusing: Literal["mean", "multiply", "max"] = "max",
    ):
        super().__init__(max_scale, min_scale)
        periods = [float(period)] if isinstance(period, (int, float)) else [float(p) for p in period]
        if not periods or any(p <= 0 for p in periods):
            raise ValueError(
                f"TrianglePredictionGuider: period must be > 0 (or a list of such), got {period}"
            )
        if period_fusing not in ("mean", "multiply", "max"):
            raise ValueError(
                f"TrianglePredictionGuider: period_fusing={period_fusing!r}; "
                "allowed: 'mean', 'multiply', 'max'"
            )
        self.periods = periods
        self.period_fusing = period_fusing

    def frame_scales(self, num_frames: int) -> torch.Tensor:
        """(T,) float32 guidance scale of each frame."""
        f = torch.linspace(0.0, 1.0, num_frames)
        waves = torch.stack([2 * (f / p - torch.floor(f / p + 0.5)).abs() for p in self.periods])
        if self.period_fusing == "mean":
            wave = waves.sum(0) / len(self.periods)
        elif self.period_fusing == "multiply":
            wave = waves.prod(0)
        else:
            wave = waves.max(0).values
        return wave * (self.max_scale - self.min_scale) + self.min_scale
