"""vwm.rollout: the reference rollout procedure (vista.md §1.13), per-sample noise streams, actions from JSON,
the ensemble reward (§1.12) and low-VRAM placement, on the tiny model (CPU)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import build_tiny, make_batch

from vwm import rollout as ro
from vwm.actions import ACTION_KEYS
from vwm.data.batch import action_batch
from vwm.diffusion.guidance import (
    IdentityGuider, LinearPredictionGuider, TrianglePredictionGuider, VanillaCFG,
)
from vwm.diffusion.sampler import HeunEDMSampler
from vwm.sampling.actions import load_action_plan, normalise_actions

T = 5  # tiny model frames


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def _inputs(b: int = 1, n_rounds: int = 1, seed: int = 0, index0: int = 0):
    frames = make_batch(b=b, t=T, seed=seed)["img_seq"][:, :3]
    actions = [action_batch([{"command": torch.tensor([1.0])}] * b)] * n_rounds
    generators = [ro.sample_generator(23, index0 + i) for i in range(b)]
    return frames, actions, generators


def _run(model, settings, b=1, seed=0, index0=0, low_vram=False, compile_unet=False):
    frames, actions, generators = _inputs(b, settings.n_rounds, seed, index0)
    placement = ro.Placement(model, "cpu", low_vram=low_vram, compile_unet=compile_unet)
    return ro.rollout(model, frames, actions, generators, settings, placement)


def test_output_length_matches_the_reference_formula():
    assert ro.output_frames(25, 1) == 25
    assert ro.output_frames(25, 4) == 25 + 22 * 3
    assert ro.output_frames(5, 3) == 9


def test_rollout_follows_the_reference_procedure(tiny, monkeypatch):
    calls = []
    make = ro.make_sampler

    def spy_make(name, n_steps, guider, *schedule):
        sampler = make(name, n_steps, guider, *schedule)

        def call(denoiser, network, noise, cond, uc, cond_frame=None, cond_mask=None, callback=None):
            out = sampler(denoiser, network, noise, cond, uc, cond_frame=cond_frame, cond_mask=cond_mask,
                          callback=callback)
            calls.append(dict(cond=cond, uc=uc, cond_frame=cond_frame.clone(), mask=cond_mask.clone(),
                              out=out.clone(), guider=guider))
            return out

        return call

    monkeypatch.setattr(ro, "make_sampler", spy_make)
    settings = ro.RolloutSettings(n_rounds=3, n_conds=2, n_steps=2)
    result = _run(tiny, settings)
    assert result.latents.shape == (1, 9, 4, 8, 8) and result.video.shape == (1, 9, 3, 64, 64)
    assert result.video.abs().max() <= 1.0
    assert [c["mask"][0].tolist() for c in calls] == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert all(isinstance(c["guider"], TrianglePredictionGuider) for c in calls)
    expected = torch.cat([calls[0]["out"], calls[1]["out"][:, 3:], calls[2]["out"][:, 3:]], dim=1)
    assert torch.equal(result.latents, expected)
    for prev, cur in zip(calls, calls[1:]):
        # The last 3 latents become the condition frames; the concat condition is the unscaled latent [-3];
        # the CLIP token is the embedding of the decoded frame [-3].
        assert torch.equal(cur["cond_frame"][:, :3], prev["out"][:, -3:])
        assert torch.equal(cur["cond"]["concat"], prev["out"][:, -3] / tiny.scale_factor)
        pixels = ro.decode_latents(tiny, prev["out"][:, -ro.CLIP_WINDOW:], ro.CLIP_WINDOW)[:, -3]
        clip = tiny.conditioner.embedders[0](pixels)
        torch.testing.assert_close(cur["cond"]["crossattn"][:, :, :64], clip, rtol=0, atol=1e-6)
    for call in calls:  # uc: CLIP, concat and actions zeroed; vector kept
        assert not call["uc"]["crossattn"].any() and not call["uc"]["concat"].any()
        assert torch.equal(call["uc"]["vector"], call["cond"]["vector"])
    assert all(not e.skip_encode for e in tiny.conditioner.embedders if hasattr(e, "skip_encode"))


def test_single_round_uses_vanilla_cfg_and_pastes_the_gt_first_frame(tiny, monkeypatch):
    guiders = []
    make = ro.make_sampler
    monkeypatch.setattr(ro, "make_sampler", lambda n, s, g, *r: guiders.append(g) or make(n, s, g, *r))
    frames, actions, generators = _inputs()
    settings = ro.RolloutSettings(n_steps=2, n_conds=0)  # no latent replacement: frame 0 is pasted afterwards
    latents = ro.sample_latents(tiny, frames, actions, generators, settings, ro.Placement(tiny, "cpu"))
    stream = ro.sample_generator(23, 0)
    torch.randn((3, 64, 64), generator=stream)  # the stream's first draw: the cond_aug noise
    z = tiny.encode_first_stage(frames[:, :1], generator=stream)
    assert isinstance(guiders[0], VanillaCFG) and guiders[0].scale == 2.5
    assert latents.shape == (1, 1, T, 4, 8, 8)
    assert torch.equal(latents[0, :, 0], z[:, 0])


def test_same_seed_is_bit_identical_and_indices_get_different_noise(tiny):
    settings = ro.RolloutSettings(n_rounds=2, n_steps=2)
    a, b = _run(tiny, settings), _run(tiny, settings)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.video, b.video)
    other = _run(tiny, settings, index0=1)
    assert not torch.allclose(a.latents[:, 1:], other.latents[:, 1:])
    n0 = ro.draw_noise((T, 4, 8, 8), [ro.sample_generator(23, 0)])
    n1 = ro.draw_noise((T, 4, 8, 8), [ro.sample_generator(23, 1)])
    assert not torch.allclose(n0, n1)


def test_a_sample_does_not_depend_on_its_batch(tiny):
    settings = ro.RolloutSettings(n_steps=2)
    pair = _run(tiny, settings, b=2)
    frames, actions, _ = _inputs(2)
    second = ro.rollout(tiny, frames[1:], [action_batch([{"command": torch.tensor([1.0])}])],
                        [ro.sample_generator(23, 1)], settings, ro.Placement(tiny, "cpu"))
    # Same noise stream; only float rounding of batched kernels differs (amplified by sigma_max = 700).
    torch.testing.assert_close(pair.latents[1:], second.latents, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(pair.latents[0], second.latents[0], rtol=1e-2, atol=1e-2)


def test_low_vram_placement_gives_the_same_latents_on_cpu(tiny):
    settings = ro.RolloutSettings(n_rounds=2, n_steps=2)
    normal = _run(tiny, settings)
    low = _run(tiny, settings, low_vram=True)
    assert torch.equal(normal.latents, low.latents)
    assert low.video.shape == normal.video.shape
    assert ro.Placement(tiny, "cpu", low_vram=True).decode_chunk(settings) == ro.LOW_VRAM_DECODE_CHUNK
    assert next(tiny.parameters()).device.type == "cpu"


def test_heun_sampler_is_selectable_and_differs_from_euler(tiny):
    assert isinstance(ro.make_sampler("heun", 3, VanillaCFG(2.0)), HeunEDMSampler)
    euler = _run(tiny, ro.RolloutSettings(n_steps=2))
    heun = _run(tiny, ro.RolloutSettings(n_steps=2, sampler="heun"))
    assert not torch.allclose(euler.latents, heun.latents)


def test_guider_choice():
    assert isinstance(ro.make_guider(None, 2.5, 1), VanillaCFG)
    assert isinstance(ro.make_guider(None, 2.5, 2), TrianglePredictionGuider)
    linear = ro.make_guider("linear", 3.0, 1)
    assert isinstance(linear, LinearPredictionGuider)
    assert linear.frame_scales(5).tolist() == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert isinstance(ro.make_guider("triangle", 1.0, 3), IdentityGuider)


def _sigmas_of(model, settings):
    """(noise level of every sampler step, the rollout, the last step's denoised estimate)."""
    steps = []
    frames, actions, generators = _inputs(1, settings.n_rounds)
    result = ro.rollout(model, frames, actions, generators, settings, ro.Placement(model, "cpu"),
                        callback=lambda info: steps.append((float(info["sigma"]), info["denoised"].clone())))
    return [s for s, _ in steps], result, steps[-1][1]


def test_noise_schedule_runs_from_sigma_max_down_to_sigma_min_then_returns_the_estimate(tiny):
    default, _, _ = _sigmas_of(tiny, ro.RolloutSettings(n_steps=3))
    assert (ro.SIGMA_MIN, ro.SIGMA_MAX) == (0.002, 700.0)  # the reference's schedule stays the default
    assert default[0] == pytest.approx(700.0) and default[-1] == pytest.approx(0.002)
    sigmas, result, denoised = _sigmas_of(tiny, ro.RolloutSettings(n_steps=3, sigma_min=4.0, sigma_max=60.0))
    assert len(sigmas) == 3 and sigmas[0] == pytest.approx(60.0) and sigmas[-1] == pytest.approx(4.0)
    assert 4.0 < sigmas[1] < 60.0
    # the final step goes from sigma_min to 0, so the sample is the denoiser's estimate at sigma_min
    torch.testing.assert_close(result.latents[:, 1:], denoised[:, 1:], rtol=1e-5, atol=1e-5)
    for heun in (False, True):  # both samplers honour the schedule
        sampler = ro.make_sampler("heun" if heun else "euler", 4, VanillaCFG(2.0), 0.5, 30.0)
        levels = sampler.discretization(4).tolist()
        assert levels[0] == pytest.approx(30.0) and levels[-2:] == [pytest.approx(0.5), 0.0]


@pytest.mark.parametrize("field, value, allowed", [
    ("n_conds", 4, "[0, 3]"), ("cfg_scale", 0.5, ">= 1"), ("n_steps", 0, ">= 1"), ("decode_chunk", 0, ">= 1"),
    ("sampler", "ddim", "euler or heun"), ("sigma_min", 0.0, "(0, sigma_max=700.0)"),
    ("sigma_min", 700.0, "(0, sigma_max=700.0)"), ("sigma_max", float("inf"), "a finite float > 0"),
    ("sigma_max", -1.0, "a finite float > 0"), ("guidance_sigma_min", -1.0, "a finite float >= 0"),
    ("guidance_sigma_min", float("nan"), "a finite float >= 0"),
])
def test_settings_errors_name_the_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}") + ".*" + re.escape(allowed)):
        ro.RolloutSettings(**{field: value}).validate(5)
    with pytest.raises(ValueError, match="more than 3 frames"):
        ro.RolloutSettings(n_rounds=2, n_conds=1).validate(3)


def test_settings_pass_the_guidance_interval_and_the_antithetic_final_step_to_the_sampler():
    assert (ro.RolloutSettings().guidance_sigma_min, ro.RolloutSettings().final_antithetic) == (0.0, False)
    for name in ("euler", "heun"):
        sampler = ro.make_sampler(name, 4, VanillaCFG(2.0), 4.0, 80.0, guidance_sigma_min=6.0, final_antithetic=True)
        assert (sampler.guidance_sigma_min, sampler.final_antithetic) == (6.0, True)
        plain = ro.make_sampler(name, 4, VanillaCFG(2.0), 4.0, 80.0)
        assert (plain.guidance_sigma_min, plain.final_antithetic) == (0.0, False)


def test_ensemble_reward_definition():
    same = torch.randn(1, 2, 5, 4, 8, 8).expand(4, -1, -1, -1, -1, -1)
    assert ro.ensemble_reward(same).tolist() == [1.0, 1.0]
    two = torch.stack([torch.zeros(1, 10), torch.full((1, 10), 2.0)])  # unbiased variance 2 everywhere
    assert ro.ensemble_reward(two).item() == pytest.approx(math.exp(-2.0), rel=1e-12)
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    expected = torch.exp(-x.var(dim=0, unbiased=True).mean(1))
    torch.testing.assert_close(ro.ensemble_reward(x), expected)
    with pytest.raises(ValueError, match=r"ens_size=1 .*>= 2"):
        ro.ensemble_reward(x[:1])


def test_zero_noise_ensemble_has_reward_exactly_one(tiny, monkeypatch):
    frames, actions, generators = _inputs(2)
    settings = ro.RolloutSettings(n_steps=2)
    placement = ro.Placement(tiny, "cpu")
    latents = ro.sample_latents(tiny, frames, actions, generators, settings, placement, ensemble=3)
    assert (ro.ensemble_reward(latents) < 1.0).all()
    monkeypatch.setattr(ro, "draw_noise", lambda shape, gens: torch.zeros(len(gens), *shape))
    latents = ro.sample_latents(tiny, frames, actions, generators, settings, placement, ensemble=3)
    assert ro.ensemble_reward(latents).tolist() == [1.0, 1.0]


def test_actions_in_reference_units_are_normalised():
    got = normalise_actions({"trajectory": [[1, 0], [2, 0.5], [3, 1], [4, 2]], "command": "left",
                                "speed": [5, 5, 6, 6], "angle": [-390, 0, 78, 780], "goal": [800, 450]})
    assert got["trajectory"].tolist() == [1, 0, 2, 0.5, 3, 1, 4, 2]
    assert got["command"].tolist() == [1.0]
    assert got["speed"].tolist() == [5, 5, 6, 6]
    torch.testing.assert_close(got["angle"], torch.tensor([-0.5, 0.0, 0.1, 1.0]))
    torch.testing.assert_close(got["goal"], torch.tensor([0.5, 0.5]))
    batch = action_batch([got, {}])
    assert batch["action_mask"].tolist() == [[True] * 5, [False] * 5]
    assert all(not batch[k][1].any() for k in ACTION_KEYS)


@pytest.mark.parametrize("raw, message", [
    ({"steer": 3}, r"unknown action key\(s\) \['steer'\]; allowed"),
    ({"trajectory": [1, 2, 3]}, r"trajectory=\[1, 2, 3\] is invalid; allowed: 8 finite numbers"),
    ({"command": 7}, r"command=7 is invalid; allowed: \[0, 1, 2, 3\]"),
    ({"command": "uturn"}, r"command='uturn' is invalid"),
    ({"angle": [0, 0, 0, 900]}, r"angle=.* steering-wheel degrees in \[-780, 780\]"),
    ({"goal": [1700, 10]}, r"goal=\[1700, 10\] is invalid; allowed: \[u, v\] with 0 < u < 1600"),
    ({"speed": [1, 2, float("nan"), 4]}, r"speed=.* 4 finite numbers"),
])
def test_action_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        normalise_actions(raw, "actions_json round 1")


def test_action_plan_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"command": 0}))
    assert [r["command"].item() for r in load_action_plan(str(path), 3)] == [0.0, 0.0, 0.0]
    path.write_text(json.dumps([{"command": 0}, {"command": "left", "speed": [1, 1, 1, 1]}]))
    plan = load_action_plan(str(path), 2)
    assert plan[1]["command"].item() == 1.0 and "speed" not in plan[0]
    with pytest.raises(ValueError, match=r"a list of 2; allowed: one object .* n_rounds=3"):
        load_action_plan(str(path), 3)
    path.write_text("{oops")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_action_plan(str(path), 1)


@pytest.mark.slow
def test_compiled_unet_samples_the_same_rollout():
    """Placement(compile_unet=True) (sample.py --compile, the default on CUDA) compiles the UNet's layers and the
    VAE decoder and draws the same two-round rollout as eager code, up to float rounding (fused kernels reorder fp32 sums; the
    second round amplifies that through the decode: measured max |diff| 2.4e-4 on latents of scale 1)."""
    settings = ro.RolloutSettings(n_rounds=2, n_steps=2, cfg_scale=2.0)
    eager = build_tiny()
    expected = _run(eager, settings)
    compiled = build_tiny()
    compiled.load_state_dict(eager.state_dict())
    got = _run(compiled, settings, compile_unet=True)
    assert any(getattr(m, "compiled_run", None) is not None for m in compiled.unet.modules())
    assert compiled.first_stage_model._decode_frames is not None, "the VAE decoder is compiled with the UNet"
    torch.testing.assert_close(got.latents, expected.latents, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.video, expected.video, rtol=2e-3, atol=2e-3)  # through the compiled decoder


def test_sampling_compiles_the_unet_with_inductors_defaults_and_the_given_overrides():
    """Sampling takes no gradients, and the stride padding that training turns off (video_unet.INDUCTOR_OPTIONS) broke
    only the backward; with it the compiled forward is faster (docs/performance.md). So Placement compiles the UNet's
    layers with Inductor's defaults, updated by `inductor_options` (bench/sample.py --inductor-option)."""
    config = torch._inductor.config
    seen = []

    def record(graph):  # noqa: ANN001, ANN202  (a post-grad pass: sees the config each graph compiles under)
        seen.append((config.comprehensive_padding, config.shape_padding, config.triton.mix_order_reduction))

    defaults = (config.comprehensive_padding, config.shape_padding, config.triton.mix_order_reduction)
    assert defaults == (True, True, True)  # torch's; training's differ in every one (test_compiled_check.py)
    with config.patch(post_grad_custom_post_pass=record):
        for options, expected in ((None, defaults), ({"shape_padding": False}, (True, False, True))):
            torch._dynamo.reset()
            seen.clear()
            model = build_tiny()
            placement = ro.Placement(model, "cpu", compile_unet=True, inductor_options=options)
            layers = [m for m in model.unet.modules() if getattr(m, "compiled_run", None) is not None]
            for layer in layers[1:]:
                layer.compiled_run = None  # one compiled layer is enough (and quick)
            model.first_stage_model._decode_frames = None  # the decoder compiles with the defaults in any case
            frames, actions, generators = _inputs()
            ro.rollout(model, frames, actions, generators, ro.RolloutSettings(n_steps=1, cfg_scale=2.0), placement)
            assert seen and set(seen) == {expected}, (options, seen)
    torch._dynamo.reset()


def test_placement_uses_the_fused_geglu_only_where_it_can_run():
    """Placement(fused_geglu=None) switches the UNet's GEGLUs to the fused kernel only for a CUDA
    bf16/fp16 UNet with Triton; on the CPU they stay plain, and an explicit True there still samples the plain
    path (the kernel refuses CPU tensors), so the rollout is bit-identical."""
    from vwm.models.layers import GEGLU

    frames, actions, generators = _inputs()
    settings = ro.RolloutSettings(n_steps=2, cfg_scale=2.0)
    model = build_tiny()
    placement = ro.Placement(model, "cpu", fused_geglu=None)
    assert placement.fused_geglu is False
    geglus = [m for m in model.unet.modules() if isinstance(m, GEGLU)]
    assert geglus and not any(m.fused for m in geglus)
    plain = ro.rollout(model, frames, actions, generators, settings, placement)
    model = build_tiny()
    placement = ro.Placement(model, "cpu", fused_geglu=True)
    assert all(m.fused for m in model.unet.modules() if isinstance(m, GEGLU))
    frames, actions, generators = _inputs()
    forced = ro.rollout(model, frames, actions, generators, settings, placement)
    assert torch.equal(forced.latents, plain.latents)


def test_bf16_decoder_changes_only_the_decode_and_stays_within_bf16_rounding():
    """Placement(decode_dtype=torch.bfloat16) (sample.py --decode_dtype bf16) runs the VAE decoder in bf16 and
    nothing else: the encoder stays fp32, the sampled latents are bit-identical (one round: no decoded frame feeds
    the conditioning), and the video differs from the fp32 decode only by bf16 rounding."""
    settings = ro.RolloutSettings(n_rounds=1, n_steps=2, cfg_scale=2.0)
    ref = build_tiny()
    expected = _run(ref, settings)
    model = build_tiny()
    model.load_state_dict(ref.state_dict())
    frames, actions, generators = _inputs(1, 1, 0, 0)
    placement = ro.Placement(model, "cpu", decode_dtype=torch.bfloat16)
    vae = model.first_stage_model
    assert {p.dtype for p in vae.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vae.encoder.parameters()} == {torch.float32}
    got = ro.rollout(model, frames, actions, generators, settings, placement)
    assert torch.equal(got.latents, expected.latents)
    assert got.video.dtype == torch.float32
    diff = (got.video - expected.video).abs()
    assert diff.max() > 0, "the bf16 decoder was not used"
    assert diff.max() < 0.05 and diff.mean() < 5e-3, (float(diff.max()), float(diff.mean()))
