"""Noise levels: the training density of sigma and the sampling schedule (Karras et al. 2022, EDM)."""

from __future__ import annotations

import torch


def randn(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal tensor of `shape` on `device`, drawn from `generator` (global RNG when None).

    The draw happens on the generator's own device (so a CPU generator can feed CUDA tensors) and is then
    moved; with a generator on `device` nothing is copied.
    """
    draw_device = generator.device if generator is not None else device
    out = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    return out.to(device) if device is not None else out


class EDMSampling:
    """Training noise levels, one per clip: ln(sigma) ~ N(p_mean, p_std^2) (EDM paper, Table 1, "p_train").

    `mixture` adds further normal components, [p_mean, p_std, probability] each; N(p_mean, p_std^2) keeps the
    remaining probability. For a model that must learn two things at different noise: the demo's
    (configs/demo/toyworld.yaml) puts most steps at high noise, where the actions decide the layout of the
    future frames, and the rest at low noise, where the fine detail (lane markings) is resolved.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, mixture: list[list[float]] | None = None):
        if p_std <= 0:
            raise ValueError(f"EDMSampling: p_std must be > 0, got {p_std}")
        self.p_mean = p_mean
        self.p_std = p_std
        self.mixture = [[float(v) for v in c] for c in mixture or []]
        for component in self.mixture:
            if len(component) != 3 or not component[1] > 0 or not component[2] >= 0:
                raise ValueError(
                    f"EDMSampling: each mixture component must be [p_mean, p_std > 0, probability >= 0], got "
                    f"{component}"
                )
        rest = 1.0 - sum(c[2] for c in self.mixture)
        if rest < -1e-9:
            raise ValueError(
                f"EDMSampling: the mixture's probabilities sum to {1.0 - rest:g}, more than 1: {self.mixture}"
            )
        self.weights = [max(rest, 0.0)] + [c[2] for c in self.mixture]

    def __call__(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """(n,) float32 sigmas, one per clip (the reference repeats each over the clip's frames).

        Draws: the standard normals (n,), then, with a mixture only, each clip's component (n,)."""
        z = randn((n,), generator=generator, device=device)
        if not self.mixture:
            return (self.p_mean + self.p_std * z).exp()
        draw_device = generator.device if generator is not None else device
        probs = torch.tensor(self.weights, dtype=torch.float64, device=draw_device)
        pick = torch.multinomial(probs, n, replacement=True, generator=generator).to(z.device)
        table = torch.tensor([[self.p_mean, self.p_std]] + [c[:2] for c in self.mixture], device=z.device)
        mean, std = table[pick].unbind(-1)
        return (mean + std * z).exp()


class EDMDiscretization:
    """Karras schedule σ_i = (σmax^(1/ρ) + i/(n-1)·(σmin^(1/ρ) - σmax^(1/ρ)))^ρ plus σ_n = 0 (EDM eq. 5)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"EDMDiscretization: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}"
            )
        if rho <= 0:
            raise ValueError(f"EDMDiscretization: rho must be > 0, got {rho}")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho

    def __call__(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(n+1,) float32 sigmas descending from sigma_max to sigma_min, followed by a final 0.

        Same formula, order and trailing zero as the reference (`append_zero`, no flip), but evaluated in
        float64 before rounding to float32, so both endpoints are exact; the reference's float32 evaluation
        is off by up to a few ulp (e.g. 700.0001 for sigma_max=700).
        """
        if n < 1:
            raise ValueError(f"EDMDiscretization: number of steps n must be >= 1, got {n}")
        ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64, device=device)
        max_inv_rho = self.sigma_max ** (1.0 / self.rho)
        min_inv_rho = self.sigma_min ** (1.0 / self.rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho
        return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
