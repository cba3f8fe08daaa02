"""Preconditioning: D(x; sigma) = c_skip·x + c_out·F(c_in·x; c_noise) (EDM paper, eq. 7 and Table 1)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@runtime_checkable
class Scaling(Protocol):
    """Maps sigma to the four preconditioning coefficients (c_skip, c_out, c_in, c_noise), same shape."""

    def __call__(self, sigma: torch.Tensor) -> Scalings: ...


class EDMScaling:
    """EDM preconditioning for data of std sigma_data (EDM paper, Table 1, "Ours")."""

    def __init__(self, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"EDMScaling: sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        """c_skip = sd²/(σ²+sd²), c_out = σ·sd/√(σ²+sd²), c_in = 1/√(σ²+sd²), c_noise = ln(σ)/4."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1 / (sigma**2 + sd2) ** 0.5
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise


class EpsScaling:
    """Epsilon prediction in EDM form: D = x - σ·F(x/√(σ²+1); σ) (EDM paper, Table 1, DDPM-style)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        """c_skip = 1, c_out = -σ, c_in = 1/√(σ²+1), c_noise = σ."""
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScaling:
    """v-prediction (Salimans & Ho 2022): EDM scaling with sigma_data=1 and c_out negated, c_noise = σ."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        """c_skip = 1/(σ²+1), c_out = -σ/√(σ²+1), c_in = 1/√(σ²+1), c_noise = σ."""
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScalingWithEDMcNoise(VScaling):
    """v-prediction with the EDM noise label c_noise = ln(σ)/4, as SVD and Vista use (vista.md §1.6.5)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        """c_skip = 1/(σ²+1), c_out = -σ/√(σ²+1), c_in = 1/√(σ²+1), c_noise = ln(σ)/4."""
        c_skip, c_out, c_in, _ = super().__call__(sigma)
        return c_skip, c_out, c_in, 0.25 * sigma.log()


class Denoiser(nn.Module):
    """D(x; σ) = network(c_in·x, c_noise)·c_out + x·c_skip per frame, on (B,T,C,H,W) video (EDM eq. 7).

    Holds no parameters; the network is passed in, so the same object serves the live and the EMA model.
    """

    def __init__(self, scaling: Scaling):
        super().__init__()
        self.scaling = scaling

    def forward(
        self,
        network: nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict[str, torch.Tensor],
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoised estimate of x (same shape and dtype); `sigma` is (B,) per clip or (B,T) per frame.

        The coefficients are computed in fp32 (c_noise = ln σ / 4 and 1/√(σ²+1) lose too much in bf16);
        only the network input is cast back to x's dtype. The network receives c_noise as (B,T).
        """
        if x.ndim != 5:
            raise ValueError(f"Denoiser: x must be (B,T,C,H,W), got shape {tuple(x.shape)}")
        b, t = x.shape[:2]
        sigma = sigma.to(device=x.device, dtype=torch.float32)
        if sigma.shape == (b,):
            sigma = sigma[:, None].expand(b, t)
        elif sigma.shape != (b, t):
            raise ValueError(
                f"Denoiser: sigma must have shape (B,)=({b},) or (B,T)=({b}, {t}), got {tuple(sigma.shape)}"
            )
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        c_skip, c_out, c_in = (c[:, :, None, None, None] for c in (c_skip, c_out, c_in))
        x32 = x.float()
        out = network((x32 * c_in).to(x.dtype), c_noise, cond, cond_mask)
        return (out.float() * c_out + x32 * c_skip).to(x.dtype)
