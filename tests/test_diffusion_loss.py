"""StandardDiffusionLoss against a loop-based transcription of vista.md §1.6.6, plus its parts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vwm.diffusion.denoiser import Denoiser, VScalingWithEDMcNoise
from vwm.diffusion.loss import (
    StandardDiffusionLoss,
    VWeighting,
    dynamics_weight,
    fourier_filter,
    structure_preservation_term,
)
from vwm.diffusion.noise import EDMSampling

CHOICES = [[], [0], [0, 1], [0, 1, 2]]


class TinyNetwork(nn.Module):
    """Deterministic stand-in for the UNet with one trainable parameter; records its inputs."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.7))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x_in, c_noise, cond, cond_mask):
        self.calls.append((x_in, c_noise, cond_mask))
        return torch.tanh(self.gain * x_in + c_noise[:, :, None, None, None]) + cond["vector"].mean()


def _make_loss(**overrides) -> StandardDiffusionLoss:
    params = dict(
        sigma_sampler_config=EDMSampling(p_mean=1.0, p_std=1.6),
        loss_weighting_config=VWeighting(),
        offset_noise_level=0.02,
        use_additional_loss=True,
        additional_loss_weight=0.1,
        replace_cond_frames=True,
        cond_frames_choices=CHOICES,
    )
    params.update(overrides)
    return StandardDiffusionLoss(**params)


def _latents(seed: int = 0, shape=(3, 5, 3, 8, 6)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _cond(b: int = 3) -> dict[str, torch.Tensor]:
    return {"vector": torch.full((b, 8), 0.01)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- an independent transcription of the reference loss, in the reference's (B·T) layout -------------


def _loop_high_pass(frames: torch.Tensor) -> torch.Tensor:
    """Reference fourier_filter(scale=0, d_s=0.25) with its Python double loop over the mask."""
    n, c, h, w = frames.shape
    mask = torch.ones(n, c, h, w)
    for i in range(h):
        for j in range(w):
            if (2 * i / h - 1) ** 2 + (2 * j / w - 1) ** 2 <= 2 * 0.25:
                mask[..., i, j] = 0.0
    spec = torch.fft.fftshift(torch.fft.fftn(frames, dim=(-2, -1)), dim=(-2, -1)) * mask
    return torch.fft.ifftn(torch.fft.ifftshift(spec, dim=(-2, -1)), dim=(-2, -1)).real


def _oracle_loss(network, x, cond, seed, loss_type, use_additional_loss, offset=0.02) -> torch.Tensor:
    b, t, c, h, w = x.shape
    g = _gen(seed)
    # Draw protocol of vwm (documented in StandardDiffusionLoss.forward): sigma, choice, noise, offset.
    sigma_clip = torch.exp(1.0 + 1.6 * torch.randn(b, generator=g))
    picks = torch.multinomial(torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64), b, True, generator=g)
    noise = torch.randn(x.shape, generator=g) + offset * torch.randn(b, t, c, generator=g)[..., None, None]
    noise = noise.reshape(b * t, c, h, w)
    inp = x.reshape(b * t, c, h, w)
    sigma = sigma_clip.repeat_interleave(t)
    mask = torch.zeros(b, t)
    for i, k in enumerate(picks.tolist()):
        mask[i, CHOICES[k]] = 1.0
    mask = mask.reshape(b * t)
    bc = lambda v: v[:, None, None, None]  # noqa: E731
    noised = inp + noise * bc((1 - mask) * sigma)
    c_skip, c_out, c_in = 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5, 1 / (sigma**2 + 1) ** 0.5
    c_noise = 0.25 * sigma.log()
    f = network((noised * bc(c_in)).reshape(b, t, c, h, w), c_noise.reshape(b, t), cond, mask.reshape(b, t))
    model_out = f.reshape(b * t, c, h, w) * bc(c_out) + noised * bc(c_skip)
    wgt = bc((sigma**2 + 1) / sigma**2)
    pred = model_out * bc(1 - mask) + inp * bc(mask)
    err = (lambda d: d**2) if loss_type == "l2" else (lambda d: d.abs())
    if not use_additional_loss:
        return (wgt * err(pred - inp)).reshape(b * t, -1).mean(1).mean()
    ps, ts = pred.reshape(b, t, c, h, w), inp.reshape(b, t, c, h, w)
    aux = err((ts[:, 1:] - ts[:, :-1]) - (ps[:, 1:] - ps[:, :-1]))  # b, t-1, c, h, w
    aux_w = torch.ones(b, t, c, h, w)
    p = 2 if loss_type == "l2" else 1
    for i in range(b):
        for ch in range(c):
            norm = max(aux[i, :, ch].abs().pow(p).sum().pow(1 / p).item(), 1e-12)
            aux_w[i, 1:, ch] = 1 + aux[i, :, ch] / norm
    aux_w = aux_w.reshape(b * t, -1)
    hf = (wgt * err(_loop_high_pass(pred) - _loop_high_pass(inp))).reshape(b * t, -1).mean(1).mean()
    return ((wgt * err(pred - inp)).reshape(b * t, -1) * aux_w).mean(1).mean() + 0.1 * hf


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
@pytest.mark.parametrize("use_additional_loss", [False, True])
def test_loss_matches_loop_transcription_of_reference(loss_type, use_additional_loss):
    x, net = _latents(), TinyNetwork()
    loss_fn = _make_loss(loss_type=loss_type, use_additional_loss=use_additional_loss)
    out = loss_fn(net, Denoiser(VScalingWithEDMcNoise()), _cond(), x, generator=_gen(11))
    expected = _oracle_loss(net, x, _cond(), 11, loss_type, use_additional_loss)
    torch.testing.assert_close(out.loss, expected, rtol=2e-5, atol=1e-6)
    assert out.per_sample.shape == (3,) and out.sigma.shape == (3,) and out.cond_mask.shape == (3, 5)
    assert (out.hf is not None) == use_additional_loss
    if not use_additional_loss:
        torch.testing.assert_close(out.loss, out.per_sample.mean())
    else:
        torch.testing.assert_close(out.loss, out.per_sample.mean() + 0.1 * out.hf.mean())


def test_perfect_prediction_gives_zero_loss():
    x = _latents()
    exact = lambda network, noised, sigma, cond, mask: x  # noqa: E731
    out = _make_loss()(TinyNetwork(), exact, _cond(), x, generator=_gen(0))
    assert out.loss.item() == 0.0 and bool((out.per_sample == 0).all()) and bool((out.hf == 0).all())

    def cheating_network(x_in, c_noise, cond, cond_mask):
        """Inverts the v-scaling so that D(x; σ) equals the clean target."""
        sigma = torch.exp(4 * c_noise.double())[:, :, None, None, None]
        noised = x_in.double() * torch.sqrt(sigma**2 + 1)
        return ((x.double() - noised / (sigma**2 + 1)) / (-sigma / torch.sqrt(sigma**2 + 1))).float()

    out = _make_loss()(cheating_network, Denoiser(VScalingWithEDMcNoise()), _cond(), x, generator=_gen(0))
    assert out.loss.item() < 1e-8


def test_condition_frames_contribute_exactly_zero_and_get_clean_input():
    x = _latents()
    den = Denoiser(VScalingWithEDMcNoise())
    loss_fn = _make_loss(cond_frames_choices=[[0, 1]])

    def perturbed(frames):
        net = TinyNetwork()

        def network(x_in, c_noise, cond, cond_mask):
            out = net(x_in, c_noise, cond, cond_mask).clone()
            out[:, frames] += 100.0
            return out

        return net, network

    net, base = perturbed([])
    ref = loss_fn(base, den, _cond(), x, generator=_gen(5))
    assert torch.equal(ref.cond_mask, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]] * 3))
    assert loss_fn(perturbed([0, 1])[1], den, _cond(), x, generator=_gen(5)).loss.item() == ref.loss.item()
    assert loss_fn(perturbed([2])[1], den, _cond(), x, generator=_gen(5)).loss.item() != ref.loss.item()

    # Condition frames enter without noise but with the un-masked σ (c_in(σ) scaling and c_noise(σ)).
    x_in, c_noise, mask = net.calls[0]
    sigma = ref.sigma[:, None, None, None]
    torch.testing.assert_close(x_in[:, :2], x[:, :2] / torch.sqrt(sigma[..., None] ** 2 + 1))
    assert not torch.allclose(x_in[:, 2:], x[:, 2:] / torch.sqrt(sigma[..., None] ** 2 + 1))
    torch.testing.assert_close(c_noise, (0.25 * ref.sigma.log())[:, None].expand(3, 5))
    assert torch.equal(mask, ref.cond_mask)


def test_cond_frame_choice_frequencies_follow_powers_of_two():
    mask = _make_loss().sample_cond_mask(60_000, 5, generator=_gen(0), device=torch.device("cpu"))
    counts = mask.sum(1)
    for k, choice in enumerate(CHOICES):
        rows = counts == len(choice)
        n = len(choice)
        assert bool((mask[rows][:, :n] == 1).all()) and bool((mask[rows][:, n:] == 0).all())
        assert abs(rows.float().mean().item() - 2**k / 15) < 0.01


def test_no_condition_frames_without_replace_cond_frames():
    loss_fn = _make_loss(replace_cond_frames=False)
    out = loss_fn(TinyNetwork(), Denoiser(VScalingWithEDMcNoise()), _cond(), _latents(), generator=_gen(0))
    assert bool((out.cond_mask == 0).all())


def test_generator_seed_determines_the_loss():
    x, den = _latents(), Denoiser(VScalingWithEDMcNoise())
    losses = [_make_loss()(TinyNetwork(), den, _cond(), x, generator=_gen(s)).loss.item() for s in (3, 3, 4)]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    # The global RNG is not touched.
    state = torch.get_rng_state()
    _make_loss()(TinyNetwork(), den, _cond(), x, generator=_gen(3))
    assert torch.equal(state, torch.get_rng_state())


def test_gradient_reaches_network_parameters():
    net = TinyNetwork()
    out = _make_loss()(net, Denoiser(VScalingWithEDMcNoise()), _cond(), _latents(), generator=_gen(0))
    out.loss.backward()
    assert net.gain.grad is not None and math.isfinite(net.gain.grad.item()) and net.gain.grad.item() != 0.0


def test_l1_differs_from_l2():
    x, den = _latents(), Denoiser(VScalingWithEDMcNoise())
    l2 = _make_loss(loss_type="l2")(TinyNetwork(), den, _cond(), x, generator=_gen(0)).loss.item()
    l1 = _make_loss(loss_type="l1")(TinyNetwork(), den, _cond(), x, generator=_gen(0)).loss.item()
    assert l1 != l2


# --- structure term: the high-pass filter ----------------------------------------------------------


def test_high_pass_removes_constant_and_low_frequency_and_keeps_checkerboard():
    h = torch.arange(16.0)[:, None]
    w = torch.arange(12.0)[None, :]
    constant = torch.full((16, 12), 3.0)
    low = torch.cos(2 * math.pi * h / 16) + torch.sin(2 * math.pi * w / 12)
    checker = (-1.0) ** (h + w)
    frames = torch.stack([constant, low, checker]).reshape(1, 3, 1, 16, 12)
    out = fourier_filter(frames)
    assert out.shape == frames.shape and out.dtype == torch.float32
    assert out[0, 0].abs().max() < 1e-5 and out[0, 1].abs().max() < 1e-5
    torch.testing.assert_close(out[0, 2], frames[0, 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(4, 4), (7, 9), (40, 72), (5, 2)])
def test_high_pass_matches_reference_loop_mask(size):
    x = torch.randn(2, 3, 2, *size)
    expected = _loop_high_pass(x.reshape(6, 2, *size)).reshape(x.shape)
    torch.testing.assert_close(fourier_filter(x), expected, atol=1e-5, rtol=1e-5)


def test_structure_term_is_zero_for_identical_low_frequency_error():
    target = torch.randn(2, 3, 2, 8, 8)
    pred = target + 0.5  # a constant offset lives entirely in the removed low frequencies
    term = structure_preservation_term(pred, target, torch.ones(2, 1, 1, 1, 1))
    assert term.shape == (2,) and term.abs().max() < 1e-10


# --- dynamics term ---------------------------------------------------------------------------------


def test_dynamics_weight_by_hand():
    pred = torch.tensor([[[[[1.0, 2.0]], [[0.0, 1.0]]],
                          [[[3.0, 2.0]], [[1.0, 1.0]]],
                          [[[0.0, 0.0]], [[2.0, 4.0]]]]], requires_grad=True)  # (1, 3, 2, 1, 2)
    target = torch.zeros_like(pred)
    weight = dynamics_weight(pred, target)
    assert weight.shape == pred.shape and not weight.requires_grad
    expected = torch.ones(1, 3, 2, 1, 2)
    for ch in range(2):
        p = pred[0, :, ch, 0].tolist()
        sq = {(t, j): (p[t][j] - p[t - 1][j]) ** 2 for t in (1, 2) for j in (0, 1)}
        norm = math.sqrt(sum(v**2 for v in sq.values()))
        for (t, j), v in sq.items():
            expected[0, t, ch, 0, j] = 1 + v / norm
    torch.testing.assert_close(weight, expected)
    assert bool((weight[:, 0] == 1).all()) and bool((weight >= 1).all())


def test_dynamics_weight_l1_uses_l1_normalisation():
    pred, target = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    extra = dynamics_weight(pred, target, "l1")[:, 1:] - 1
    torch.testing.assert_close(extra.sum(dim=(1, 3, 4)), torch.ones(2, 3))


# --- user errors -----------------------------------------------------------------------------------


def test_user_errors_name_the_field():
    with pytest.raises(ValueError, match="loss_type='l3'; allowed: 'l2', 'l1'"):
        _make_loss(loss_type="l3")
    with pytest.raises(ValueError, match="replace_cond_frames=True needs cond_frames_choices"):
        _make_loss(cond_frames_choices=None)
    loss_fn = _make_loss(cond_frames_choices=[[0, 7]])
    with pytest.raises(ValueError, match=r"cond_frames_choices=\[\[0, 7\]\] must .* T=5"):
        loss_fn(TinyNetwork(), Denoiser(VScalingWithEDMcNoise()), _cond(), _latents(), generator=_gen(0))
