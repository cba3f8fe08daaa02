"""Analytic properties of the diffusion pieces: preconditioning, schedules, weightings, and the samplers
driven by the closed-form denoiser of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vwm.diffusion.denoiser import Denoiser, EDMScaling, EpsScaling, VScaling, VScalingWithEDMcNoise
from vwm.diffusion.guidance import IdentityGuider, VanillaCFG
from vwm.diffusion.loss import EDMWeighting, EpsWeighting, UnitWeighting, VWeighting
from vwm.diffusion.noise import EDMDiscretization, EDMSampling
from vwm.diffusion.sampler import EulerEDMSampler, make_denoise_fn, sample_euler_edm, sample_heun_edm

DATA_STD = 0.5


class GaussianIdealNetwork(nn.Module):
    """Network whose v-scaled output makes D(x, σ) = x·s²/(s²+σ²), the ideal denoiser of N(0, s²) data.

    It only sees c_in·x and c_noise = ln(σ)/4, as a real network would, and inverts the preconditioning.
    """

    def __init__(self, data_std: float):
        super().__init__()
        self.data_std = data_std
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor | None]] = []

    def forward(self, x_in, c_noise, cond, cond_mask):
        self.calls.append((x_in, c_noise, cond, cond_mask))
        sigma = torch.exp(4 * c_noise.double())[:, :, None, None, None]
        x = x_in.double() * torch.sqrt(sigma**2 + 1)
        ideal = x * self.data_std**2 / (self.data_std**2 + sigma**2)
        c_skip, c_out = 1 / (sigma**2 + 1), -sigma / torch.sqrt(sigma**2 + 1)
        return ((ideal - c_skip * x) / c_out).float()


def ideal_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * DATA_STD**2 / (DATA_STD**2 + sigma**2)


def _sigmas() -> torch.Tensor:
    return torch.tensor([1e-4, 0.002, 0.1, 1.0, 3.0, 80.0, 700.0])


# --- preconditioning -------------------------------------------------------------------------------


def test_v_scaling_with_edm_c_noise_formulas_and_limits():
    sigma = _sigmas().double()
    c_skip, c_out, c_in, c_noise = VScalingWithEDMcNoise()(sigma)
    torch.testing.assert_close(c_skip, 1 / (sigma**2 + 1))
    torch.testing.assert_close(c_out, -sigma / torch.sqrt(sigma**2 + 1))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + 1))
    torch.testing.assert_close(c_noise, 0.25 * torch.log(sigma))
    # sigma -> 0: D -> x (skip everything); sigma -> inf: D -> -F (output only).
    assert abs(c_skip[0] - 1) < 1e-7 and abs(c_out[0]) < 1e-3 and abs(c_in[0] - 1) < 1e-7
    assert c_skip[-1] < 1e-5 and abs(c_out[-1] + 1) < 1e-5
    # Same coefficients as plain v-scaling; only the noise label differs.
    v_skip, v_out, v_in, v_noise = VScaling()(sigma)
    torch.testing.assert_close((v_skip, v_out, v_in, v_noise), (c_skip, c_out, c_in, sigma))


@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 1.7])
def test_edm_scaling_identities(sigma_data):
    sigma = _sigmas().double()
    c_skip, c_out, c_in, c_noise = EDMScaling(sigma_data)(sigma)
    # EDM eq. 114-117: unit-variance network input and unit-variance training target.
    torch.testing.assert_close(c_in**2 * (sigma**2 + sigma_data**2), torch.ones_like(sigma))
    torch.testing.assert_close((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * sigma**2, c_out**2)
    torch.testing.assert_close(c_noise, 0.25 * torch.log(sigma))
    assert abs(c_skip[0] - 1) < 1e-7 and abs(c_out[0]) < 1e-3
    # The EDM loss weight is 1/c_out².
    torch.testing.assert_close(EDMWeighting(sigma_data)(sigma), 1 / c_out**2)


def test_eps_scaling():
    sigma = _sigmas().double()
    c_skip, c_out, c_in, c_noise = EpsScaling()(sigma)
    torch.testing.assert_close(c_skip, torch.ones_like(sigma))
    torch.testing.assert_close(c_out, -sigma)
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + 1))
    torch.testing.assert_close(c_noise, sigma)


def test_v_scaling_recovers_data_from_true_v_prediction():
    """With F = v = (n - σ·y)/√(1+σ²) (Salimans & Ho), the v-scaled denoiser returns y exactly."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(3, 4, 2, 5, 5, generator=g)
    n = torch.randn(3, 4, 2, 5, 5, generator=g)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    s5 = sigma[:, None, None, None, None]
    x = y + s5 * n
    seen = {}

    def v_network(x_in, c_noise, cond, cond_mask):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return (n - s5 * y) / torch.sqrt(1 + s5**2)

    out = Denoiser(VScalingWithEDMcNoise())(v_network, x, sigma, {})
    torch.testing.assert_close(out, y, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(seen["x_in"], x / torch.sqrt(1 + s5**2))
    torch.testing.assert_close(seen["c_noise"], 0.25 * torch.log(sigma)[:, None].expand(3, 4))


def test_denoiser_per_clip_and_per_frame_sigma_agree_and_dtypes():
    x = torch.randn(2, 3, 4, 6, 6)
    net = GaussianIdealNetwork(DATA_STD)
    den = Denoiser(VScalingWithEDMcNoise())
    per_clip = den(net, x, torch.tensor([0.3, 5.0]), {})
    per_frame = den(net, x, torch.tensor([[0.3] * 3, [5.0] * 3]), {})
    assert torch.equal(per_clip, per_frame)
    expected = x * DATA_STD**2 / (DATA_STD**2 + torch.tensor([0.3, 5.0])[:, None, None, None, None] ** 2)
    torch.testing.assert_close(per_clip, expected, atol=1e-5, rtol=1e-5)
    assert net.calls[0][1].shape == (2, 3) and net.calls[0][1].dtype == torch.float32
    # Low-precision input: the network input is cast back to x's dtype, the noise label stays fp32.
    out = den(lambda x_in, c_noise, cond, mask: x_in, x.bfloat16(), torch.tensor([0.3, 5.0]), {})
    assert out.dtype == torch.bfloat16


def test_denoiser_rejects_bad_sigma_shape():
    with pytest.raises(ValueError, match=r"sigma must have shape \(B,\)=\(2,\) or \(B,T\)=\(2, 3\)"):
        Denoiser(VScalingWithEDMcNoise())(GaussianIdealNetwork(1.0),
                                          torch.randn(2, 3, 1, 2, 2), torch.ones(3), {})


# --- schedules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,sigma_min,sigma_max", [(1, 0.002, 80.0), (2, 0.002, 80.0), (15, 0.002, 700.0),
                                                   (50, 0.002, 700.0), (25, 0.02, 14.6)])
def test_edm_discretization_endpoints_monotone_length(n, sigma_min, sigma_max):
    sigmas = EDMDiscretization(sigma_min=sigma_min, sigma_max=sigma_max)(n)
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
    assert sigmas[0].item() == torch.tensor(sigma_max).item()
    assert sigmas[-1].item() == 0.0
    if n > 1:
        assert sigmas[-2].item() == torch.tensor(sigma_min).item()
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_edm_discretization_matches_karras_formula():
    rho, smin, smax, n = 7.0, 0.002, 80.0, 10
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    expected = [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]
    torch.testing.assert_close(EDMDiscretization()(n)[:-1], torch.tensor(expected, dtype=torch.float32))


def test_edm_discretization_rejects_bad_values():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        EDMDiscretization()(0)
    with pytest.raises(ValueError, match="sigma_min=5.0, sigma_max=1.0"):
        EDMDiscretization(sigma_min=5.0, sigma_max=1.0)


def test_edm_sampling_log_normal_statistics_and_seeding():
    sampler = EDMSampling(p_mean=1.0, p_std=1.6)
    sigma = sampler(200_000, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (200_000,) and bool((sigma > 0).all())
    log_sigma = sigma.log()
    assert abs(log_sigma.mean().item() - 1.0) < 0.02
    assert abs(log_sigma.std().item() - 1.6) < 0.02
    a = sampler(8, generator=torch.Generator().manual_seed(3))
    b = sampler(8, generator=torch.Generator().manual_seed(3))
    c = sampler(8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_edm_sampling_mixture_draws_each_component_with_its_probability():
    sampler = EDMSampling(p_mean=1.5, p_std=0.3, mixture=[[-1.0, 0.4, 0.3]])
    log_sigma = sampler(200_000, generator=torch.Generator().manual_seed(0)).log()
    low = log_sigma < 0.4  # over 3.5 standard deviations from both means
    assert abs(low.float().mean().item() - 0.3) < 0.01
    assert abs(log_sigma[~low].mean().item() - 1.5) < 0.01 and abs(log_sigma[~low].std().item() - 0.3) < 0.01
    assert abs(log_sigma[low].mean().item() + 1.0) < 0.01 and abs(log_sigma[low].std().item() - 0.4) < 0.01
    a = sampler(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, sampler(8, generator=torch.Generator().manual_seed(3)))
    # no mixture (or an empty one) draws exactly as before: the same sigmas and the same generator state after
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain, empty = EDMSampling(1.5, 1.0), EDMSampling(1.5, 1.0, mixture=[])
    assert torch.equal(plain(8, generator=g1), empty(8, generator=g2))
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    only_low = EDMSampling(1.5, 1.0, mixture=[[-1.0, 0.5, 1.0]])  # the main component keeps probability 0
    assert only_low(1000, generator=torch.Generator().manual_seed(0)).log().max().item() < 1.5


def test_edm_sampling_mixture_rejects_bad_components():
    with pytest.raises(ValueError, match=r"\[p_mean, p_std > 0, probability >= 0\], got \[0.0, 0.0, 0.5\]"):
        EDMSampling(1.0, 1.0, mixture=[[0.0, 0.0, 0.5]])
    with pytest.raises(ValueError, match="got \\[0.0, 1.0\\]"):
        EDMSampling(1.0, 1.0, mixture=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="sum to 1.2, more than 1"):
        EDMSampling(1.0, 1.0, mixture=[[0.0, 1.0, 0.6], [-1.0, 1.0, 0.6]])


# --- loss weightings -------------------------------------------------------------------------------


def test_loss_weightings_equal_their_formulas():
    sigma = _sigmas()
    torch.testing.assert_close(VWeighting()(sigma), (sigma**2 + 1) / sigma**2)
    torch.testing.assert_close(EDMWeighting(0.5)(sigma), (sigma**2 + 0.25) / (0.25 * sigma**2))
    torch.testing.assert_close(EpsWeighting()(sigma), 1 / sigma**2)
    torch.testing.assert_close(UnitWeighting()(sigma), torch.ones_like(sigma))
    # The v weight is 1/c_out² of the v-scaling.
    _, c_out, _, _ = VScalingWithEDMcNoise()(sigma.double())
    torch.testing.assert_close(VWeighting()(sigma.double()), 1 / c_out**2)


# --- samplers driven by the ideal Gaussian denoiser ------------------------------------------------


def _exact_ratio(sigmas: torch.Tensor) -> float:
    """Std of the probability-flow ODE solution at 0 relative to its std at sigmas[0], for N(0, s²) data."""
    return DATA_STD / math.sqrt(DATA_STD**2 + sigmas[0].item() ** 2)


# Euler is first order: with sigma_max=80 it needs ~200 steps for a 1.5% std error; Heun needs ~40.
@pytest.mark.parametrize("sampler,steps", [(sample_euler_edm, 200), (sample_heun_edm, 40)])
@pytest.mark.parametrize("s_churn", [0.0, 10.0])
def test_sampler_with_ideal_denoiser_returns_data_distribution(sampler, steps, s_churn):
    sigmas = EDMDiscretization(sigma_max=80.0)(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, 4, 16, 16, generator=g) * sigmas[0]
    out = sampler(ideal_denoise, x, sigmas, s_churn=s_churn, generator=g)
    assert abs(out.std().item() / DATA_STD - 1) < 0.03
    assert abs(out.mean().item()) < 0.01


def test_euler_converges_at_first_order_and_heun_at_second_order():
    """Halving the step size halves Euler's error and quarters Heun's (ideal denoiser, float64)."""

    def error(sampler, steps: int) -> float:
        sigmas = EDMDiscretization(sigma_max=80.0)(steps).double()
        x = torch.full((1, 1, 1, 1, 1), 80.0, dtype=torch.float64)
        return abs(sampler(ideal_denoise, x, sigmas).item() - 80.0 * _exact_ratio(sigmas))

    euler_40, euler_80 = error(sample_euler_edm, 40), error(sample_euler_edm, 80)
    heun_40, heun_80 = error(sample_heun_edm, 40), error(sample_heun_edm, 80)
    assert 0.4 < euler_80 / euler_40 < 0.6
    assert 0.15 < heun_80 / heun_40 < 0.3
    assert heun_40 < 0.2 * euler_40


@pytest.mark.parametrize("guider", [IdentityGuider(), VanillaCFG(2.5)])
def test_sampler_through_denoiser_and_closure_returns_data_distribution(guider):
    """Same check through make_denoise_fn, Denoiser(VScalingWithEDMcNoise) and a network."""
    sigmas = EDMDiscretization(sigma_max=80.0)(200)
    cond = {"vector": torch.zeros(12, 8)}
    network = GaussianIdealNetwork(DATA_STD)
    denoise = make_denoise_fn(Denoiser(VScalingWithEDMcNoise()), network, cond, cond, guider)
    x = torch.randn(12, 5, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    out = sample_euler_edm(denoise, x, sigmas)
    assert abs(out.std().item() / DATA_STD - 1) < 0.03


def test_euler_edm_sampler_scales_initial_noise_and_returns_data_distribution():
    sampler = EulerEDMSampler(200, EDMDiscretization(sigma_max=80.0), IdentityGuider())
    net = GaussianIdealNetwork(DATA_STD)
    noise = torch.randn(12, 5, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    out = sampler(Denoiser(VScalingWithEDMcNoise()), net, noise, {"vector": torch.zeros(12, 8)})
    # First network input is c_in(σ0)·noise·√(1+σ0²) = noise (the reference's start).
    torch.testing.assert_close(net.calls[0][0], noise, atol=1e-5, rtol=1e-5)
    assert len(net.calls) == 200
    # Starting std √(1+σ0²) instead of √(s²+σ0²) changes the result by a factor 1 + O(1/σ0²).
    assert abs(out.std().item() / DATA_STD - 1) < 0.03
