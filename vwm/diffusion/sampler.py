"""EDM samplers (Karras et al. 2022, Algorithm 2) as functions over a `denoise(x, sigma) -> x0` closure.

`make_denoise_fn` builds that closure from the preconditioned denoiser, the network, the conditioning, a
guider and the condition frames; `EulerEDMSampler` / `HeunEDMSampler` are the config objects that run the
whole reference procedure (vista.md §1.7): schedule, initial noise scaling, loop, final frame replacement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from vwm.diffusion.denoiser import Denoiser
from vwm.diffusion.noise import EDMDiscretization, randn

log = logging.getLogger(__name__)

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


@runtime_checkable
class Guider(Protocol):
    """Combines unconditional and conditional estimates on (B,T,...); see vwm.diffusion.guidance."""

    needs_uncond: bool

    def __call__(self, x_uncond: torch.Tensor | None, x_cond: torch.Tensor) -> torch.Tensor: ...


def _edm_loop(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    heun: bool,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    generator: torch.Generator | None,
    callback: Callback | None,
    final_antithetic: bool = False,
) -> torch.Tensor:
    """Shared Euler / Heun loop of EDM Algorithm 2 (churn on lines 4-6, Euler line 8, Heun lines 9-11).

    `final_antithetic`: the step to σ = 0 returns the mean of the denoiser's estimates at x and at its
    antithetic partner (see `antithetic_denoise`) instead of the estimate at x alone."""
    num_steps = len(sigmas) - 1
    levels = sigmas.tolist()  # host copies for the branch decisions, so the loop never syncs on them
    gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0) if num_steps > 0 else 0.0
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = gamma_max if s_tmin <= levels[i] <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            eps = randn(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype) * s_noise
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = denoise(x, sigma_hat)
        if final_antithetic and levels[i + 1] == 0:
            denoised = antithetic_denoise(denoise, x, sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if heun and levels[i + 1] > 0:
            d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * ((d + d_next) / 2.0)
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
    return x


def antithetic_denoise(denoise: DenoiseFn, x: torch.Tensor, sigma: torch.Tensor,
                       denoised: torch.Tensor | None = None) -> torch.Tensor:
    """Antithetic estimate of the clean sample at noise level σ: (D(x) + D(x'))/2 with x' = 2·D(x) - x.

    x = D(x) + σ·n̂ splits x into the estimate and the noise it implies, n̂ = (x - D(x))/σ; x' = D(x) - σ·n̂ is
    the same estimate with that noise negated (antithetic variates). An error of the denoiser that is linear
    in the noise, e.g. the part of c_skip·x that an under-trained network fails to cancel (per-pixel grain
    through a pixel-block first stage), enters the two estimates with opposite signs: D(c + σn) = c + b·n
    leaves b²/σ·n in the mean instead of b·n (0.3 -> 0.0225 at σ 4). The estimate is averaged over two
    inputs, so it is smoother than either. Costs one more denoiser call; `denoised` = D(x) when already
    computed.
    """
    if denoised is None:
        denoised = denoise(x, sigma)
    return 0.5 * (denoised + denoise(2.0 * denoised - x, sigma))


def sample_euler_edm(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    final_antithetic: bool = False,
) -> torch.Tensor:
    """Euler variant of EDM Algorithm 2 (stochastic when s_churn > 0) from x at sigmas[0] down to sigmas[-1].

    `x` must already carry noise of level sigmas[0] (the reference scales unit noise by √(1+σ0²); see
    EulerEDMSampler). Per step: gamma = min(s_churn/N, √2-1) when s_tmin <= σ_i <= s_tmax, else 0 (N =
    number of steps); σ̂ = (1+gamma)·σ_i; x += s_noise·√(σ̂²-σ_i²)·ε with ε from `generator`; then
    x += (σ_{i+1} - σ̂)·(x - denoise(x, σ̂))/σ̂. `callback` gets {i, x, sigma, sigma_hat, denoised}.
    `final_antithetic`: the last step (to σ = 0) returns `antithetic_denoise` instead of denoise(x, σ̂).
    """
    return _edm_loop(denoise, x, sigmas, False, s_churn, s_tmin, s_tmax, s_noise, generator, callback,
                     final_antithetic)


def sample_heun_edm(
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    final_antithetic: bool = False,
) -> torch.Tensor:
    """EDM Algorithm 2 with its 2nd-order (Heun) correction on every step whose σ_{i+1} > 0.

    Same arguments and churn as `sample_euler_edm`; costs two denoiser calls per step except the last.
    """
    return _edm_loop(denoise, x, sigmas, True, s_churn, s_tmin, s_tmax, s_noise, generator, callback,
                     final_antithetic)


def _replace_frames(x: torch.Tensor, cond_frame: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """x with the frames where cond_mask (B,T) is set taken from cond_frame (vista.md §1.6.7)."""
    keep = cond_mask.to(device=x.device).bool()[:, :, None, None, None]
    return torch.where(keep, cond_frame.to(device=x.device, dtype=x.dtype), x)


def _needs_replacement(cond_frame: torch.Tensor | None, cond_mask: torch.Tensor | None) -> bool:
    """Validate the condition-frame inputs; True when cond_mask selects at least one frame."""
    if cond_mask is None:
        return False
    if cond_mask.ndim != 2:
        raise ValueError(f"cond_mask must be (B,T), got shape {tuple(cond_mask.shape)}")
    if not bool(cond_mask.any()):
        return False
    if cond_frame is None or cond_frame.ndim != 5 or tuple(cond_frame.shape[:2]) != tuple(cond_mask.shape):
        got = None if cond_frame is None else tuple(cond_frame.shape)
        raise ValueError(
            f"cond_mask {tuple(cond_mask.shape)} selects frames, so cond_frame must be (B,T,C,H,W) with the "
            f"same B,T; got {got}"
        )
    return True


def check_guidance_sigma_min(value: float, owner: str = "") -> float:
    """`value` when it is a valid guidance interval bound (a finite float >= 0), else ValueError naming `owner`."""
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{owner + ': ' if owner else ''}guidance_sigma_min must be a finite float >= 0, "
                         f"got {value!r}")
    return float(value)


def make_denoise_fn(
    denoiser: Denoiser,
    network: nn.Module,
    cond: dict[str, torch.Tensor],
    uc: dict[str, torch.Tensor] | None,
    guider: Guider,
    cond_frame: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    guidance_sigma_min: float = 0.0,
) -> DenoiseFn:
    """Closure denoise(x (B,T,C,H,W), sigma scalar) -> guided x0, with condition frames replaced in its input.

    Each call: frames where `cond_mask` is set are overwritten by `cond_frame` (latent replacement,
    vista.md §1.6.7); then, when the guider needs it and `uc` is given, ONE network pass runs on the batch
    [uc half; cond half] (every tensor of `uc` / `cond` concatenated along dim 0, unconditional first, as
    the reference does) and the guider combines the halves. With `uc=None` the reference falls back to
    uc=cond, whose guided result equals the conditional estimate exactly, so only the conditional pass
    runs. `cond_mask` (or None) is handed to the network for both halves.

    Replacing inside the closure equals the reference's replacement of x before each step whenever
    s_churn = 0 (every Vista setting). With churn the reference adds the churn noise after replacing, so its
    network sees noised condition frames; here it always sees the clean ones.

    `guidance_sigma_min` > 0 limits guidance to an interval of noise levels (Kynkäänniemi et al. 2024,
    "Applying guidance in a limited interval"): at σ <= guidance_sigma_min the closure returns the conditional
    estimate alone (one network pass, the guider is not applied), above it the guided one. Guidance decides
    the coarse layout at high noise; at low noise it mostly scales up the difference of the two passes' errors.
    When set, each call reads σ on the host (one device sync per call on a GPU).
    """
    check_guidance_sigma_min(guidance_sigma_min)
    replace = _needs_replacement(cond_frame, cond_mask)
    use_uncond = guider.needs_uncond and uc is not None
    if use_uncond:
        differing = sorted(set(cond) ^ set(uc))
        if differing:
            raise ValueError(f"cond and uc must have the same keys; differing keys: {differing}")
        batch_cond = {k: torch.cat([uc[k], cond[k]]) for k in cond}
        batch_mask = None if cond_mask is None else torch.cat([cond_mask, cond_mask])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if replace:
            x = _replace_frames(x, cond_frame, cond_mask)
        sigma_b = sigma.reshape(1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        if guidance_sigma_min > 0.0 and float(sigma.max()) <= guidance_sigma_min:
            return denoiser(network, x, sigma_b, cond, cond_mask)  # outside the guidance interval
        if not use_uncond:
            out = denoiser(network, x, sigma_b, cond, cond_mask)
            return out if guider.needs_uncond else guider(None, out)
        out = denoiser(network, torch.cat([x, x]), torch.cat([sigma_b, sigma_b]), batch_cond, batch_mask)
        x_uncond, x_cond = out.chunk(2)
        return guider(x_uncond, x_cond)

    return denoise


class EulerEDMSampler:
    """Reference sampling procedure (vista.md §1.7) with the Euler variant of EDM Algorithm 2."""

    _sample = staticmethod(sample_euler_edm)

    def __init__(
        self,
        num_steps: int,
        discretization_config: EDMDiscretization,
        guider_config: Guider,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        verbose: bool = False,
        guidance_sigma_min: float = 0.0,
        final_antithetic: bool = False,
    ):
        if num_steps < 1:
            raise ValueError(f"{type(self).__name__}: num_steps must be >= 1, got {num_steps}")
        if s_churn < 0:
            raise ValueError(f"{type(self).__name__}: s_churn must be >= 0, got {s_churn}")
        self.num_steps = num_steps
        self.discretization = discretization_config
        self.guider = guider_config
        self.s_churn = s_churn
        self.s_tmin = s_tmin
        self.s_tmax = s_tmax
        self.s_noise = s_noise
        self.verbose = verbose
        self.guidance_sigma_min = check_guidance_sigma_min(guidance_sigma_min, type(self).__name__)
        self.final_antithetic = bool(final_antithetic)

    def __call__(
        self,
        denoiser: Denoiser,
        network: nn.Module,
        noise: torch.Tensor,
        cond: dict[str, torch.Tensor],
        uc: dict[str, torch.Tensor] | None = None,
        cond_frame: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        num_steps: int | None = None,
        guider: Guider | None = None,
    ) -> torch.Tensor:
        """Sample (B,T,C,H,W) latents from unit Gaussian `noise` of that shape.

        Steps: sigmas = discretization(num_steps) (n+1 values, trailing 0); x = noise·√(1+σ0²) (the
        reference's start, i.e. the std of unit-variance data plus noise σ0, not EDM's σ0); the sampling
        loop over the guided denoise closure, which replaces condition frames before every network call;
        finally the condition frames of the result are set to `cond_frame` again. Guidance applies only at
        noise levels above `guidance_sigma_min` (0: at every level; see `make_denoise_fn`); with
        `final_antithetic` the last step returns the antithetic estimate (`antithetic_denoise`).
        `num_steps` and `guider` override the configured ones for this call.
        """
        steps = self.num_steps if num_steps is None else num_steps
        guider = self.guider if guider is None else guider
        sigmas = self.discretization(steps, device=noise.device)
        if self.verbose:
            log.info(
                "%s: %d steps, %s, %s", type(self).__name__, steps,
                type(self.discretization).__name__, type(guider).__name__,
            )
        x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
        denoise = make_denoise_fn(denoiser, network, cond, uc, guider, cond_frame, cond_mask,
                                  self.guidance_sigma_min)
        x = self._sample(
            denoise, x, sigmas,
            s_churn=self.s_churn, s_tmin=self.s_tmin, s_tmax=self.s_tmax, s_noise=self.s_noise,
            generator=generator, callback=callback, final_antithetic=self.final_antithetic,
        )
        if _needs_replacement(cond_frame, cond_mask):
            x = _replace_frames(x, cond_frame, cond_mask)
        return x


class HeunEDMSampler(EulerEDMSampler):
    """Reference sampling procedure with EDM Algorithm 2's 2nd-order Heun steps (good with fewer steps)."""

    _sample = staticmethod(sample_heun_edm)
