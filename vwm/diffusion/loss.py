"""Vista's diffusion training loss (vista.md §1.6.6): weighted x0-space error on non-condition frames,
re-weighted by the dynamics-enhancement term, plus the structure-preservation (high-frequency) term."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vwm.diffusion.denoiser import Denoiser
from vwm.diffusion.noise import EDMSampling, randn

LossType = Literal["l2", "l1"]


@runtime_checkable
class LossWeighting(Protocol):
    """Maps sigma to the loss weight lambda(sigma), same shape."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor: ...


class UnitWeighting:
    """lambda(σ) = 1."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        """Ones shaped like sigma."""
        return torch.ones_like(sigma)


class EDMWeighting:
    """lambda(σ) = (σ² + σ_data²)/(σ·σ_data)² = 1/c_out², the EDM loss weight (EDM paper, Table 1)."""

    def __init__(self, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"EDMWeighting: sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weight per sigma, same shape."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VWeighting(EDMWeighting):
    """lambda(σ) = (σ² + 1)/σ², the v-prediction weight (EDMWeighting with σ_data = 1, vista.md §1.6.5)."""

    def __init__(self):
        super().__init__(sigma_data=1.0)


class EpsWeighting:
    """lambda(σ) = 1/σ², the epsilon-prediction weight."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weight per sigma, same shape."""
        return sigma**-2.0


@functools.lru_cache(maxsize=16)
def _fourier_mask(height: int, width: int, scale: float, d_s: float, device: torch.device) -> torch.Tensor:
    """(H, W) float32 multiplier of the shifted spectrum: `scale` where (2h/H-1)²+(2w/W-1)² <= 2·d_s, else 1.

    Evaluated in float64 so the boundary matches the reference's Python-float loop; cached, never mutated.
    """
    fh = (2 * torch.arange(height, dtype=torch.float64) / height - 1) ** 2
    fw = (2 * torch.arange(width, dtype=torch.float64) / width - 1) ** 2
    low = fh[:, None] + fw[None, :] <= 2 * d_s
    return torch.where(low, scale, 1.0).to(device=device, dtype=torch.float32)


def fourier_filter(x: torch.Tensor, scale: float = 0.0, d_s: float = 0.25) -> torch.Tensor:
    """2-D frequency filter of each image (last two dims); scale=0 is Vista's high-pass (vista.md §1.6.6).

    FFT over (H, W), fftshift, multiply the low frequencies (2h/H-1)²+(2w/W-1)² <= 2·d_s by `scale` and keep
    the rest, inverse shift, inverse FFT, real part. Computed in fp32, differentiable.
    """
    height, width = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    spectrum = spectrum * _fourier_mask(height, width, float(scale), float(d_s), x.device)
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1)).real


def _error(a: torch.Tensor, b: torch.Tensor, loss_type: LossType) -> torch.Tensor:
    """Element-wise (a-b)² for l2, |a-b| for l1."""
    diff = a - b
    return diff**2 if loss_type == "l2" else diff.abs()


def dynamics_weight(pred: torch.Tensor, target: torch.Tensor, loss_type: LossType = "l2") -> torch.Tensor:
    """Vista's dynamics-enhancement re-weighting (vista.md §1.6.6), detached, shaped like pred (B,T,C,H,W).

    Motion error Δ = (target[t]-target[t-1]) - (pred[t]-pred[t-1]) for t >= 1; a = Δ² (|Δ| for l1) is
    normalised to unit L2 norm (L1 for l1) over all (T-1)·H·W positions of each clip and channel; the weight
    is 1 on frame 0 and 1 + a on later frames. It carries no gradient.
    """
    with torch.no_grad():
        motion_error = _error(target[:, 1:] - target[:, :-1], pred[:, 1:] - pred[:, :-1], loss_type)
        b, t1, c, h, w = motion_error.shape
        flat = rearrange(motion_error, "b t c h w -> b (t h w) c")
        flat = F.normalize(flat, p=2.0 if loss_type == "l2" else 1.0, dim=1)
        normalised = rearrange(flat, "b (t h w) c -> b t c h w", t=t1, h=h, w=w)
        first = torch.zeros_like(pred[:, :1], dtype=normalised.dtype)
        return 1.0 + torch.cat([first, normalised], dim=1)


def structure_preservation_term(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, loss_type: LossType = "l2"
) -> torch.Tensor:
    """Vista's structure-preservation loss per clip (B,): mean of weight·err(hf(pred), hf(target)) (§1.6.6).

    hf is `fourier_filter(·, scale=0, d_s=0.25)`, a per-frame high-pass; err is squared (l2) or absolute (l1);
    `weight` broadcasts against (B,T,C,H,W).
    """
    err = _error(fourier_filter(pred), fourier_filter(target), loss_type)
    return (weight * err).flatten(1).mean(1)


@dataclass
class DiffusionLossOutput:
    """Result of StandardDiffusionLoss.forward: the scalar to backprop plus per-clip terms for logging."""

    loss: torch.Tensor
    """Scalar: per_sample.mean() + additional_loss_weight · hf.mean() (hf term only when enabled)."""
    per_sample: torch.Tensor
    """(B,) main weighted error per clip (dynamics re-weighted when use_additional_loss)."""
    hf: torch.Tensor | None
    """(B,) structure-preservation term per clip, before additional_loss_weight; None when disabled."""
    sigma: torch.Tensor
    """(B,) noise level of each clip."""
    cond_mask: torch.Tensor
    """(B,T) float, 1 on the clean condition frames."""


class StandardDiffusionLoss(nn.Module):
    """Vista's training objective (vista.md §1.6.6) on clean latents x (B,T,C,H,W), computed in x0 space."""

    def __init__(
        self,
        sigma_sampler_config: EDMSampling,
        loss_weighting_config: LossWeighting,
        loss_type: LossType = "l2",
        offset_noise_level: float = 0.0,
        use_additional_loss: bool = False,
        additional_loss_weight: float = 0.1,
        replace_cond_frames: bool = False,
        cond_frames_choices: list[list[int]] | None = None,
    ):
        super().__init__()
        if loss_type not in ("l2", "l1"):
            raise ValueError(f"StandardDiffusionLoss: loss_type={loss_type!r}; allowed: 'l2', 'l1'")
        if offset_noise_level < 0:
            raise ValueError(
                f"StandardDiffusionLoss: offset_noise_level must be >= 0, got {offset_noise_level}"
            )
        if replace_cond_frames:
            if not cond_frames_choices:
                raise ValueError(
                    "StandardDiffusionLoss: replace_cond_frames=True needs cond_frames_choices, a non-empty "
                    f"list of frame-index lists such as [[], [0], [0, 1]]; got {cond_frames_choices!r}"
                )
            if any(i < 0 for choice in cond_frames_choices for i in choice):
                raise ValueError(
                    f"StandardDiffusionLoss: cond_frames_choices must hold frame indices >= 0, got "
                    f"{cond_frames_choices!r}"
                )
        self.sigma_sampler = sigma_sampler_config
        self.loss_weighting = loss_weighting_config
        self.loss_type: LossType = loss_type
        self.offset_noise_level = offset_noise_level
        self.use_additional_loss = use_additional_loss
        self.additional_loss_weight = additional_loss_weight
        self.replace_cond_frames = replace_cond_frames
        self.cond_frames_choices = [list(c) for c in cond_frames_choices] if cond_frames_choices else []

    def sample_cond_mask(
        self, batch: int, num_frames: int, *, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """(B,T) float mask of condition frames: choice i of cond_frames_choices drawn with weight 2^i.

        All zeros (and no draw) unless replace_cond_frames.
        """
        mask = torch.zeros(batch, num_frames, device=device)
        if not self.replace_cond_frames:
            return mask
        longest = max(len(c) for c in self.cond_frames_choices)
        highest = max((i for c in self.cond_frames_choices for i in c), default=-1)
        if longest >= num_frames or highest >= num_frames:
            raise ValueError(
                f"StandardDiffusionLoss: cond_frames_choices={self.cond_frames_choices} must leave a noisy "
                f"frame and index frames < T={num_frames}"
            )
        table = torch.zeros(len(self.cond_frames_choices), num_frames)
        for row, choice in enumerate(self.cond_frames_choices):
            table[row, choice] = 1.0
        weights = 2.0 ** torch.arange(len(self.cond_frames_choices), dtype=torch.float64)
        draw_device = generator.device if generator is not None else device
        picks = torch.multinomial(weights.to(draw_device), batch, replacement=True, generator=generator)
        return table.to(device)[picks.to(device)]

    def forward(
        self,
        network: nn.Module,
        denoiser: Denoiser,
        cond: dict[str, torch.Tensor],
        x: torch.Tensor,
        *,
        generator: torch.Generator | None,
    ) -> DiffusionLossOutput:
        """Loss of `denoiser(network, ...)` on clean latents x (B,T,C,H,W); all draws come from `generator`.

        Draw order: sigma (B,), condition-frame choice (B,), noise like x, offset noise (B,T,C).
        Condition frames get no noise but the denoiser still receives the un-masked σ; their prediction is
        replaced by the target, so they contribute exactly 0.
        """
        if x.ndim != 5:
            raise ValueError(f"StandardDiffusionLoss: x must be (B,T,C,H,W), got shape {tuple(x.shape)}")
        b, t, c = x.shape[:3]
        x = x.float()
        sigma = self.sigma_sampler(b, generator=generator, device=x.device).float()
        mask = self.sample_cond_mask(b, t, generator=generator, device=x.device)
        noise = randn(tuple(x.shape), generator=generator, device=x.device)
        if self.offset_noise_level > 0.0:
            offset = randn((b, t, c), generator=generator, device=x.device)
            noise = noise + self.offset_noise_level * offset[..., None, None]
        m = mask[:, :, None, None, None]
        noised = x + noise * ((1.0 - m) * sigma[:, None, None, None, None])
        denoised = denoiser(network, noised, sigma, cond, mask).float()
        weight = self.loss_weighting(sigma).float()[:, None, None, None, None]
        pred = denoised * (1.0 - m) + x * m

        err = weight * _error(pred, x, self.loss_type)
        if not self.use_additional_loss:
            per_sample = err.flatten(1).mean(1)
            return DiffusionLossOutput(per_sample.mean(), per_sample, None, sigma, mask)
        per_sample = (err * dynamics_weight(pred, x, self.loss_type)).flatten(1).mean(1)
        hf = structure_preservation_term(pred, x, weight, self.loss_type)
        loss = per_sample.mean() + self.additional_loss_weight * hf.mean()
        return DiffusionLossOutput(loss, per_sample, hf, sigma, mask)
