"""Guiders, the guided denoise closure, condition-frame replacement and sampler determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vwm.diffusion.denoiser import Denoiser, VScalingWithEDMcNoise
from vwm.diffusion.guidance import (
    IdentityGuider,
    LinearPredictionGuider,
    TrianglePredictionGuider,
    VanillaCFG,
)
from vwm.diffusion.noise import EDMDiscretization
from vwm.diffusion.sampler import (
    EulerEDMSampler,
    HeunEDMSampler,
    antithetic_denoise,
    make_denoise_fn,
    sample_euler_edm,
)

B, T, C, H, W = 2, 4, 3, 5, 6


class CondNetwork(nn.Module):
    """Elementwise stand-in for the UNet that depends on every conditioning input; records each call."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict[str, torch.Tensor | None]] = []

    def forward(self, x_in, c_noise, cond, cond_mask):
        self.calls.append({"x_in": x_in, "c_noise": c_noise, "cond_mask": cond_mask, **cond})
        b = x_in.shape[0]
        out = 0.5 * x_in * (1 + cond["vector"].mean(-1).view(b, 1, 1, 1, 1))
        out = out + cond["crossattn"].sum((1, 2)).view(b, 1, 1, 1, 1) + 0.1 * cond["concat"][:, None]
        out = out + 0.05 * c_noise[:, :, None, None, None]
        if cond_mask is not None:
            out = out + 0.2 * cond_mask[:, :, None, None, None]
        return torch.tanh(out)


def _conds(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    cond = {"vector": torch.randn(B, 16, generator=g), "crossattn": torch.randn(B, 1, 8, generator=g),
            "concat": torch.randn(B, C, H, W, generator=g)}
    uc = {"vector": cond["vector"], "crossattn": torch.zeros(B, 1, 8), "concat": torch.zeros(B, C, H, W)}
    return cond, uc


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, C, H, W, generator=torch.Generator().manual_seed(seed))


def _sampler(guider=None, steps: int = 6, **kw) -> EulerEDMSampler:
    return EulerEDMSampler(steps, EDMDiscretization(sigma_max=700.0), guider or VanillaCFG(2.0), **kw)


DENOISER = Denoiser(VScalingWithEDMcNoise())


# --- guiders ---------------------------------------------------------------------------------------


def test_vanilla_cfg_formula():
    x_u, x_c = torch.randn(B, T, C, H, W), torch.randn(B, T, C, H, W)
    torch.testing.assert_close(VanillaCFG(2.5)(x_u, x_c), x_u + 2.5 * (x_c - x_u))
    assert VanillaCFG(2.5).needs_uncond


def test_identity_guider_returns_conditional_and_needs_no_uncond():
    x_c = torch.randn(B, T, C, H, W)
    assert IdentityGuider()(None, x_c) is x_c and not IdentityGuider().needs_uncond


def test_linear_prediction_guider_scales_frames_linearly():
    guider = LinearPredictionGuider(max_scale=3.0, min_scale=1.5)
    torch.testing.assert_close(guider.frame_scales(T), torch.tensor([1.5, 2.0, 2.5, 3.0]))
    out = guider(torch.zeros(B, T, C, H, W), torch.ones(B, T, C, H, W))
    expected = torch.tensor([1.5, 2.0, 2.5, 3.0]).view(1, T, 1, 1, 1).expand(B, T, C, H, W)
    torch.testing.assert_close(out, expected)


def test_triangle_prediction_guider_shape():
    guider = TrianglePredictionGuider(max_scale=2.5, min_scale=1.0)
    torch.testing.assert_close(guider.frame_scales(5), torch.tensor([1.0, 1.75, 2.5, 1.75, 1.0]))
    s = guider.frame_scales(25)
    assert s[0].item() == pytest.approx(1.0) and s[-1].item() == pytest.approx(1.0)
    assert int(s.argmax()) == 12 and s[12].item() == pytest.approx(2.5)
    torch.testing.assert_close(s, s.flip(0))
    out = guider(torch.zeros(1, 5, 1, 1, 1), torch.ones(1, 5, 1, 1, 1))
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 1.75, 2.5, 1.75, 1.0]))


@pytest.mark.parametrize("fusing", ["mean", "multiply", "max"])
def test_triangle_prediction_guider_multiple_periods(fusing):
    f = torch.linspace(0, 1, 9)
    waves = torch.stack([2 * (f / p - torch.floor(f / p + 0.5)).abs() for p in (1.0, 0.5)])
    fused = {"mean": waves.mean(0), "multiply": waves.prod(0), "max": waves.max(0).values}[fusing]
    guider = TrianglePredictionGuider(max_scale=3.0, min_scale=1.0, period=[1.0, 0.5], period_fusing=fusing)
    torch.testing.assert_close(guider.frame_scales(9), fused * 2.0 + 1.0)


def test_triangle_prediction_guider_rejects_bad_values():
    with pytest.raises(ValueError, match="period_fusing='sum'; allowed: 'mean', 'multiply', 'max'"):
        TrianglePredictionGuider(period_fusing="sum")
    with pytest.raises(ValueError, match="period must be > 0"):
        TrianglePredictionGuider(period=0.0)


# --- the guided denoise closure ----------------------------------------------------------------------


def test_batched_cfg_equals_two_separate_passes():
    cond, uc = _conds()
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0]])
    cond_frame, x, sigma = _noise(7), _noise(8) * 3.0, torch.tensor(3.0)
    net = CondNetwork()
    guided = make_denoise_fn(DENOISER, net, cond, uc, VanillaCFG(2.0), cond_frame, mask)(x, sigma)
    assert len(net.calls) == 1 and net.calls[0]["x_in"].shape[0] == 2 * B
    torch.testing.assert_close(net.calls[0]["cond_mask"], torch.cat([mask, mask]))
    x_rep = torch.where(mask.bool()[:, :, None, None, None], cond_frame, x)
    sig = sigma.expand(B)
    d_u = DENOISER(CondNetwork(), x_rep, sig, uc, mask)
    d_c = DENOISER(CondNetwork(), x_rep, sig, cond, mask)
    torch.testing.assert_close(guided, d_u + 2.0 * (d_c - d_u), rtol=1e-6, atol=1e-6)


def test_identity_guider_and_missing_uc_run_a_single_conditional_pass():
    cond, uc = _conds()
    x, sigma = _noise(), torch.tensor(2.0)
    expected = DENOISER(CondNetwork(), x, sigma.expand(B), cond, None)
    for guider, maybe_uc in ((IdentityGuider(), uc), (VanillaCFG(3.0), None)):
        net = CondNetwork()
        out = make_denoise_fn(DENOISER, net, cond, maybe_uc, guider)(x, sigma)
        assert len(net.calls) == 1 and net.calls[0]["x_in"].shape[0] == B
        assert torch.equal(out, expected)


def test_closure_user_errors():
    cond, uc = _conds()
    with pytest.raises(ValueError, match=r"differing keys: \['concat'\]"):
        partial_uc = {k: uc[k] for k in ("vector", "crossattn")}
        make_denoise_fn(DENOISER, CondNetwork(), cond, partial_uc, VanillaCFG(2.0))
    with pytest.raises(ValueError, match="selects frames, so cond_frame must be"):
        make_denoise_fn(DENOISER, CondNetwork(), cond, uc, VanillaCFG(2.0), None, torch.ones(B, T))


# --- full sampler ----------------------------------------------------------------------------------


def _reference_style_loop(noise, cond, uc, cond_frame, mask, scale, steps):
    """The reference procedure written out (vista.md §1.7, §1.6.7): scale the noise by √(1+σ0²); before each
    step overwrite condition frames; CFG on the [uc; c] batch; Euler step; overwrite again at the end."""
    sigmas = EDMDiscretization(sigma_max=700.0)(steps)
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
    m = mask[:, :, None, None, None]
    both = {k: torch.cat([uc[k], cond[k]]) for k in cond}
    for i in range(steps):
        x = x * (1 - m) + cond_frame * m
        s = sigmas[i].expand(2 * B)
        d_u, d_c = DENOISER(CondNetwork(), torch.cat([x, x]), s, both, torch.cat([mask, mask])).chunk(2)
        denoised = d_u + scale * (d_c - d_u)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]
    return x * (1 - m) + cond_frame * m


def test_euler_edm_sampler_matches_reference_procedure_and_keeps_condition_frames():
    cond, uc = _conds()
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 1.0, 0]])
    cond_frame, noise = _noise(3), _noise(4)
    net = CondNetwork()
    out = _sampler(VanillaCFG(2.0))(DENOISER, net, noise, cond, uc, cond_frame, mask)
    keep = mask.bool()[:, :, None, None, None].expand_as(out)
    assert torch.equal(out[keep], cond_frame[keep])
    assert not torch.allclose(out[~keep], cond_frame[~keep])
    torch.testing.assert_close(out, _reference_style_loop(noise, cond, uc, cond_frame, mask, 2.0, 6),
                               rtol=1e-5, atol=1e-5)
    # Every network call saw the clean condition frames (scaled by c_in) in both CFG halves.
    sigmas = EDMDiscretization(sigma_max=700.0)(6)
    assert len(net.calls) == 6
    for call, sigma in zip(net.calls, sigmas):
        expected = cond_frame / torch.sqrt(sigma**2 + 1)
        for half in call["x_in"].chunk(2):
            torch.testing.assert_close(half[keep], expected[keep])


def test_heun_sampler_calls_network_twice_per_step_except_last():
    net = CondNetwork()
    cond, uc = _conds()
    sampler = HeunEDMSampler(5, EDMDiscretization(sigma_max=700.0), VanillaCFG(2.0))
    out = sampler(DENOISER, net, _noise(), cond, uc)
    assert len(net.calls) == 2 * 5 - 1 and out.shape == (B, T, C, H, W)


def test_sampler_is_deterministic_given_the_generator():
    cond, uc = _conds()
    run = lambda seed, churn: _sampler(s_churn=churn)(  # noqa: E731
        DENOISER, CondNetwork(), _noise(), cond, uc, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(0, 0.0), run(0, 0.0))
    assert torch.equal(run(0, 0.0), run(1, 0.0))  # no churn: the generator is not used
    assert torch.equal(run(0, 4.0), run(0, 4.0))
    assert not torch.equal(run(0, 4.0), run(1, 4.0))


def test_churn_draws_from_the_generator_only():
    sigmas = EDMDiscretization(sigma_max=80.0)(5)
    x = _noise() * sigmas[0]
    denoise = lambda x, sigma: 0.5 * x / (0.25 + sigma**2)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    global_state = torch.get_rng_state()
    before = g.get_state()
    sample_euler_edm(denoise, x, sigmas, generator=g)
    assert torch.equal(g.get_state(), before)
    sample_euler_edm(denoise, x, sigmas, s_churn=2.0, generator=g)
    assert not torch.equal(g.get_state(), before)
    assert torch.equal(torch.get_rng_state(), global_state)
    # s_tmin/s_tmax bound where churn applies: a window that excludes every sigma means no draw.
    before = g.get_state()
    sample_euler_edm(denoise, x, sigmas, s_churn=2.0, s_tmin=100.0, s_tmax=200.0, generator=g)
    assert torch.equal(g.get_state(), before)


def test_churn_noise_amount_matches_edm_algorithm_2():
    """One step σ=2 -> 1 with denoise ≡ 0 gives x̂/σ̂, x̂ = x + s_noise·√(σ̂²-σ²)·ε, σ̂ = (1+γ)σ."""
    sigmas = torch.tensor([2.0, 1.0])
    x = torch.zeros(1, 1, 1, 4, 4)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731
    out = sample_euler_edm(zero, x, sigmas, s_churn=0.3, s_noise=1.5, generator=g1)
    gamma = min(0.3 / 1, 2**0.5 - 1)
    sigma_hat = 2.0 * (1 + gamma)
    eps = torch.randn(x.shape, generator=g2) * 1.5
    torch.testing.assert_close(out, eps * (sigma_hat**2 - 4.0) ** 0.5 * (1.0 / sigma_hat))


def test_callback_sees_every_step():
    seen = []
    cond, uc = _conds()
    _sampler(steps=4)(DENOISER, CondNetwork(), _noise(), cond, uc, callback=lambda d: seen.append(d["i"]))
    assert seen == [0, 1, 2, 3]


def test_sampler_rejects_bad_num_steps():
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        _sampler(steps=0)


# --- guidance interval and the antithetic final step -------------------------------------------------


def test_guidance_interval_uses_the_conditional_estimate_at_and_below_its_lower_bound():
    cond, uc = _conds()
    x = _noise() * 3.0
    plain = make_denoise_fn(DENOISER, CondNetwork(), cond, uc, VanillaCFG(2.0))
    net = CondNetwork()
    limited = make_denoise_fn(DENOISER, net, cond, uc, VanillaCFG(2.0), guidance_sigma_min=4.0)
    conditional = DENOISER(CondNetwork(), x, torch.tensor(4.0).expand(B), cond, None)
    # above the bound: the guided estimate, one batched pass
    assert torch.equal(limited(x, torch.tensor(5.0)), plain(x, torch.tensor(5.0)))
    assert net.calls[-1]["x_in"].shape[0] == 2 * B
    # at (and below) the bound: the conditional estimate alone, one conditional pass
    assert torch.equal(limited(x, torch.tensor(4.0)), conditional)
    assert net.calls[-1]["x_in"].shape[0] == B
    with pytest.raises(ValueError, match="guidance_sigma_min must be a finite float >= 0"):
        make_denoise_fn(DENOISER, CondNetwork(), cond, uc, VanillaCFG(2.0), guidance_sigma_min=-1.0)


def test_sampler_guidance_interval_skips_the_unconditional_pass_in_the_low_noise_steps():
    cond, uc = _conds()
    disc = EDMDiscretization(sigma_min=4.0, sigma_max=80.0)
    levels = disc(6).tolist()[:-1]
    net = CondNetwork()
    EulerEDMSampler(6, disc, VanillaCFG(2.0), guidance_sigma_min=10.0)(DENOISER, net, _noise(), cond, uc)
    assert [c["x_in"].shape[0] for c in net.calls] == [2 * B if s > 10.0 else B for s in levels]
    # 0 (the default) guides every step, as before
    net = CondNetwork()
    EulerEDMSampler(6, disc, VanillaCFG(2.0))(DENOISER, net, _noise(), cond, uc)
    assert [c["x_in"].shape[0] for c in net.calls] == [2 * B] * 6


def test_antithetic_denoise_cancels_an_error_linear_in_the_noise():
    """A denoiser that returns the clean sample plus b times the noise in its input (the grain an under-trained
    network leaves) keeps only b²/σ of it under the antithetic estimate (the partner's noise is -(σ - 2b)·n);
    a general one is averaged over the two inputs."""
    clean, noise, sigma, b = _noise(5), _noise(6), torch.tensor(4.0), 0.3
    x = clean + sigma * noise
    grainy = lambda y, s: clean + b * (y - clean) / s  # noqa: E731
    torch.testing.assert_close(grainy(x, sigma), clean + b * noise)
    torch.testing.assert_close(antithetic_denoise(grainy, x, sigma), clean + b**2 / sigma * noise)
    tanh = lambda y, s: torch.tanh(y) / s  # noqa: E731
    d = tanh(x, sigma)
    torch.testing.assert_close(antithetic_denoise(tanh, x, sigma, d), 0.5 * (d + tanh(2 * d - x, sigma)))


def test_final_antithetic_changes_only_the_last_step_and_costs_one_pass():
    cond, uc = _conds()
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0]])
    cond_frame, noise = _noise(3), _noise(4)
    disc = EDMDiscretization(sigma_min=4.0, sigma_max=80.0)
    seen_plain, seen_anti = [], []
    plain = EulerEDMSampler(5, disc, VanillaCFG(2.0))(DENOISER, CondNetwork(), noise, cond, uc, cond_frame, mask,
                                                     callback=seen_plain.append)
    net = CondNetwork()
    anti = EulerEDMSampler(5, disc, VanillaCFG(2.0), final_antithetic=True)(
        DENOISER, net, noise, cond, uc, cond_frame, mask, callback=seen_anti.append)
    assert len(net.calls) == 5 + 1
    for a, b in zip(seen_plain[:-1], seen_anti[:-1]):
        assert torch.equal(a["x"], b["x"])
    x_last, sigma_last = seen_plain[-2]["x"], disc(5)[-2]
    denoise = make_denoise_fn(DENOISER, CondNetwork(), cond, uc, VanillaCFG(2.0), cond_frame, mask)
    expected = antithetic_denoise(denoise, x_last, sigma_last)
    expected = torch.where(mask.bool()[:, :, None, None, None], cond_frame, expected)
    torch.testing.assert_close(anti, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(anti, plain)
