"""Long-horizon autoregressive sampling with a DiffusionEngine (reference/vista.md §1.13) and the ensemble
reward (§1.12).

Round 1 is conditioned on `n_conds` encoded ground-truth frames; every later round on the last 3 latents of
the previous one (latent replacement), with the CLIP image taken from the decoded frame that becomes the new
round's frame 0 and the concat condition set to that frame's unscaled latent (the VAE-encoder embedder's
`skip_encode`). A video of T-frame rounds has T + (T - 3)·(n_rounds - 1) frames.

Every random draw of sample i (condition-frame noise, VAE posterior noise, each round's initial noise) comes
from its own CPU generator seeded by (seed, i), so a sample does not depend on the batch it is drawn in, on
the device, or on the samples before it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vwm.actions import ACTION_KEYS
from vwm.data.batch import FPS_ID, MOTION_BUCKET_ID
from vwm.defaults import SAMPLING_STEPS
from vwm.diffusion.guidance import (
    IdentityGuider, LinearPredictionGuider, TrianglePredictionGuider, VanillaCFG,
)
from vwm.diffusion.noise import EDMDiscretization
from vwm.diffusion.sampler import EulerEDMSampler, Guider, HeunEDMSampler
from vwm.models.engine import DiffusionEngine, step_seed
from vwm.models.fp8 import convert_to_fp8
from vwm.models.fused_geglu import available as fused_geglu_available
from vwm.models.fused_groupnorm import available as fused_groupnorm_available
from vwm.models.layers import use_fused_geglu, use_fused_groupnorm

log = logging.getLogger(__name__)

GuiderName = Literal["vanilla", "linear", "triangle"]
SamplerName = Literal["euler", "heun"]

OVERLAP = 3
"""Latents carried from one round into the next as its condition frames (the reference's 3)."""
CLIP_WINDOW = 5
"""Latents decoded per round to get the next CLIP frame: the frame at -OVERLAP with 2 neighbours on each side
for the temporal decoder (the reference decodes the last 14 to use one)."""
UC_ZERO_KEYS = ("cond_frames", "cond_frames_without_noise", *ACTION_KEYS)
"""Inputs zeroed in the unconditional branch (reference sample.py: CLIP, concat latent and every action)."""
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 700.0, 7.0
"""Sampling schedule of the reference (EDM discretisation with sigma_max 700): RolloutSettings' defaults."""
LOW_VRAM_DECODE_CHUNK = 6
"""Frames per VAE decode window in low-VRAM mode (windows overlap by 3, so each adds 3 new frames)."""


@dataclass(frozen=True)
class RolloutSettings:
    """How to sample: rounds, condition frames, steps, guidance, sampler, cond_aug and VAE decode window."""

    n_rounds: int = 1
    n_conds: int = 1
    n_steps: int = SAMPLING_STEPS
    cfg_scale: float = 2.5
    guider: GuiderName | None = None
    """None: vanilla CFG for one round, the triangle schedule for several (the reference's choice)."""
    sampler: SamplerName = "euler"
    cond_aug: float = 0.0
    decode_chunk: int | None = None
    """Frames per final VAE decode window; None: the model's en_and_decode_n_samples_a_time."""
    sigma_min: float = SIGMA_MIN
    """Last noise level of the schedule before the final step to 0 (that step returns the denoiser's estimate
    at sigma_min). The reference's 0.002 suits a model trained down to low noise; a model trained mostly at
    high noise (the demo's) gives cleaner frames when the schedule stops where it was trained."""
    sigma_max: float = SIGMA_MAX
    """First noise level of the schedule (the reference: 700)."""
    guidance_sigma_min: float = 0.0
    """Guidance only at noise levels above this (Kynkäänniemi et al. 2024, guidance in a limited interval); at
    and below it the sampler uses the conditional estimate alone. 0 (the reference): guidance at every level."""
    final_antithetic: bool = False
    """The last step (sigma_min -> 0) returns the mean of the estimates at x and at its antithetic partner
    (vwm.diffusion.sampler.antithetic_denoise): the noise-linear part of the denoiser's error, the pixel grain of
    an under-trained model, cancels; one more guided network pass per round. False: the reference's estimate."""

    def validate(self, num_frames: int) -> None:
        """Raise ValueError naming the field, its value and what is allowed, for a model of num_frames."""
        checks = (
            ("n_rounds", self.n_rounds, self.n_rounds >= 1, "an int >= 1"),
            ("n_steps", self.n_steps, self.n_steps >= 1, "an int >= 1"),
            ("n_conds", self.n_conds, 0 <= self.n_conds <= min(OVERLAP, num_frames - 1),
             f"an int in [0, {min(OVERLAP, num_frames - 1)}]"),
            ("cfg_scale", self.cfg_scale, math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0,
             "a finite float >= 1 (1 disables guidance)"),
            ("guider", self.guider, self.guider in (None, "vanilla", "linear", "triangle"),
             "vanilla, linear or triangle"),
            ("sampler", self.sampler, self.sampler in ("euler", "heun"), "euler or heun"),
            ("cond_aug", self.cond_aug, math.isfinite(self.cond_aug) and self.cond_aug >= 0.0,
             "a float >= 0"),
            ("decode_chunk", self.decode_chunk, self.decode_chunk is None or self.decode_chunk >= 1,
             "an int >= 1 or None"),
            ("sigma_max", self.sigma_max, math.isfinite(self.sigma_max) and self.sigma_max > 0.0,
             "a finite float > 0"),
            ("sigma_min", self.sigma_min,
             math.isfinite(self.sigma_min) and 0.0 < self.sigma_min < self.sigma_max,
             f"a float in (0, sigma_max={self.sigma_max!r})"),
            ("guidance_sigma_min", self.guidance_sigma_min,
             math.isfinite(self.guidance_sigma_min) and self.guidance_sigma_min >= 0.0, "a finite float >= 0"),
        )
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")
        if self.n_rounds > 1 and num_frames <= OVERLAP:
            raise ValueError(f"n_rounds={self.n_rounds} needs more than {OVERLAP} frames per round; the "
                             f"model has num_frames={num_frames}")


def output_frames(num_frames: int, n_rounds: int) -> int:
    """Frames of a rollout: T + (T - 3)·(n_rounds - 1)."""
    return num_frames + (num_frames - OVERLAP) * (n_rounds - 1)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator of sample `index` under run seed `seed` (independent streams for different indices)."""
    return torch.Generator().manual_seed(step_seed(seed, index))


def draw_noise(shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(B, *shape) standard normal noise, row i drawn from generators[i] (on the CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def make_guider(name: GuiderName | None, cfg_scale: float, n_rounds: int) -> Guider:
    """Guider of the reference: VanillaCFG(s) for one round, TrianglePredictionGuider(s, 1) for several;
    `linear` is LinearPredictionGuider(s, 1); scale 1 is no guidance (no unconditional pass)."""
    name = name or ("triangle" if n_rounds > 1 else "vanilla")
    if cfg_scale == 1.0:
        return IdentityGuider()
    if name == "vanilla":
        return VanillaCFG(cfg_scale)
    if name == "linear":
        return LinearPredictionGuider(max_scale=cfg_scale, min_scale=1.0)
    if name == "triangle":
        return TrianglePredictionGuider(max_scale=cfg_scale, min_scale=1.0)
    raise ValueError(f"guider={name!r} is invalid; allowed: vanilla, linear, triangle")


def make_sampler(name: SamplerName, n_steps: int, guider: Guider, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, guidance_sigma_min: float = 0.0,
                 final_antithetic: bool = False) -> EulerEDMSampler:
    """Deterministic EDM sampler (no churn), Euler or Heun, over the Karras schedule from sigma_max down to
    sigma_min and then 0 (default: the reference's 700 -> 0.002), guided only above guidance_sigma_min."""
    cls = {"euler": EulerEDMSampler, "heun": HeunEDMSampler}.get(name)
    if cls is None:
        raise ValueError(f"sampler={name!r} is invalid; allowed: euler, heun")
    return cls(num_steps=n_steps, discretization_config=EDMDiscretization(sigma_min, sigma_max, RHO),
               guider_config=guider, s_churn=0.0, s_tmin=0.0, s_tmax=999.0, s_noise=1.0,
               guidance_sigma_min=guidance_sigma_min, final_antithetic=final_antithetic)


class Placement:
    """Where the parts of a model run: all on `device`, or (low_vram) each moved there only while in use.

    Constructing it prepares the model in place: eval mode, no gradients, the UNet cast to `unet_dtype`
    (default bf16 on CUDA, fp32 elsewhere; inputs are cast on the way in and outputs back to fp32, so the
    sampler state stays fp32), everything on `device` (low_vram: on the CPU), and with `compile_unet` the
    UNet's layers and the VAE decoder compiled (`VideoUNet.compile_layers(inference=True)`: Inductor's defaults,
    updated by `inductor_options`); with `fp8` its large linear layers run as FP8 products
    (`vwm.models.fp8`, Hopper or newer). The conditioner and the VAE keep their fp32 weights, except the VAE
    decoder when `decode_dtype` is given (bf16: within bf16 rounding of the fp32 frames, 58 dB PSNR, and 1.75 ->
    0.96 s for a 25x576x1024 clip on an H100, docs/performance.md). `fused_geglu` runs the feed-forward GEGLUs as
    one Triton kernel each (`vwm.models.fused_geglu`; None: where it can run), an option for now: it measured
    slower than the plain compiled path. `fused_groupnorm` runs the UNet's and the VAE's GroupNorms, with the SiLU
    after them, as `vwm.models.fused_groupnorm`'s Triton kernels (None: where they can run).
    """

    def __init__(self, model: DiffusionEngine, device: torch.device | str, low_vram: bool = False,
                 unet_dtype: torch.dtype | None = None, compile_unet: bool = False, fp8: bool = False,
                 decode_dtype: torch.dtype | None = None, inductor_options: dict | None = None,
                 fused_geglu: bool | None = False, fused_groupnorm: bool | None = False):
        self.model = model
        self.device = torch.device(device)
        self.low_vram = low_vram
        self.unet_dtype = unet_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        model.eval().requires_grad_(False)
        model.model.to(dtype=self.unet_dtype)
        decoder = getattr(model.first_stage_model, "decoder", None)
        if decode_dtype is not None and isinstance(decoder, nn.Module):
            decoder.to(dtype=decode_dtype)  # decode_first_stage's output is cast back to fp32 (decode_latents)
        model.to("cpu" if low_vram else self.device)
        if fp8:
            if self.unet_dtype != torch.bfloat16:
                raise ValueError("fp8 sampling needs the bf16 UNet (unet_dtype=torch.bfloat16)")
            if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
                raise ValueError(f"--fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                                 f"{torch.cuda.get_device_name(self.device)} has none: sample without --fp8")
            convert_to_fp8(model.unet)
        # The feed-forward GEGLU as one kernel (vwm.models.fused_geglu; None: wherever it can run, a CUDA bf16/fp16
        # UNet with Triton; FP8-converted projections keep their own path). Off by default: on an H100 its Triton
        # product is slower than cuBLAS's, 74 against 60 ms per batch-2 forward (docs/performance.md).
        if fused_geglu is None:
            fused_geglu = (self.device.type == "cuda" and self.unet_dtype in (torch.bfloat16, torch.float16)
                           and fused_geglu_available())
        self.fused_geglu = bool(fused_geglu)
        use_fused_geglu(model.unet, self.fused_geglu)
        if fused_groupnorm is None:
            fused_groupnorm = self.device.type == "cuda" and fused_groupnorm_available()
        self.fused_groupnorm = bool(fused_groupnorm)
        use_fused_groupnorm(model.unet, self.fused_groupnorm)
        use_fused_groupnorm(model.first_stage_model, self.fused_groupnorm)
        if compile_unet and not any(getattr(m, "compiled_run", None) for m in model.unet.modules()):
            # Regional compilation (one graph per layer shape, compiled at the first round): the sampler calls
            # the UNet with the same shapes every step, so the cost is paid once per rollout shape.
            model.unet.compile_layers(inductor_options=inductor_options, inference=True)
            if hasattr(model.first_stage_model, "compile_decoder"):
                model.first_stage_model.compile_decoder()

    @contextlib.contextmanager
    def use(self, module: nn.Module) -> Iterator[None]:
        """Have `module` on the device for the duration (low_vram: moved there and back to the CPU)."""
        if not self.low_vram:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def network(self, x: torch.Tensor, c_noise: torch.Tensor, cond: dict[str, torch.Tensor],
                cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet call the denoiser makes, in the UNet's dtype, returning the input's dtype."""
        out = self.model.model(x.to(self.unet_dtype), c_noise, cond, cond_mask)
        return out.to(x.dtype)

    def decode_chunk(self, settings: RolloutSettings) -> int | None:
        """Frames per final decode window: the setting, else LOW_VRAM_DECODE_CHUNK or the model's value."""
        if settings.decode_chunk is not None:
            return settings.decode_chunk
        return LOW_VRAM_DECODE_CHUNK if self.low_vram else self.model.en_and_decode_n_samples_a_time


# ----------------------------------------------------------------------------------------------- sampling


@contextlib.contextmanager
def _timed(timings: dict[str, float] | None, key: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if timings is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _conditioning(model: DiffusionEngine, placement: Placement, pixels: torch.Tensor,
                  concat_input: torch.Tensor, actions: Mapping[str, torch.Tensor], cond_aug: float,
                  skip_encode: bool):
    """(c, uc) for one round; with skip_encode the concat input is an unscaled latent used as is."""
    dev, b = placement.device, pixels.shape[0]
    batch = {
        "cond_frames_without_noise": pixels.to(dev),
        "cond_frames": concat_input.to(dev),
        "cond_aug": torch.full((b,), float(cond_aug), device=dev),
        "fps_id": torch.full((b,), float(FPS_ID), device=dev),
        "motion_bucket_id": torch.full((b,), float(MOTION_BUCKET_ID), device=dev),
        **{k: v.to(dev) for k, v in actions.items()},
    }
    embedders = list(model.conditioner.embedders)
    uc_keys = [k for k in UC_ZERO_KEYS if k in {e.input_key for e in embedders}]
    with placement.use(model.conditioner), model.conditioner.latent_condition_frames(skip_encode):
        return model.get_conditioning(batch, uc_keys=uc_keys)


def decode_latents(model: DiffusionEngine, z: torch.Tensor, chunk: int,
                   overlap: int = OVERLAP) -> torch.Tensor:
    """Scaled latents (B,T,C,h,w) -> fp32 pixels (B,T,3,H,W), unclamped, in windows of `chunk` frames
    whose `overlap` shared frames are averaged (the reference's decode_first_stage)."""
    return model.decode_first_stage(z, overlap=overlap, chunk_size=chunk).float()


@torch.no_grad()
def sample_latents(
    model: DiffusionEngine,
    frames: torch.Tensor,
    actions: Sequence[Mapping[str, torch.Tensor]],
    generators: Sequence[torch.Generator],
    settings: RolloutSettings,
    placement: Placement,
    ensemble: int = 1,
    callback: Callable[[dict[str, Any]], None] | None = None,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Scaled latents (E, B, L, C, h, w) of `ensemble` rollouts per clip, L = output_frames(T, n_rounds).

    frames: (B, n, 3, H, W) in [-1, 1], the clip's first frames (n >= max(n_conds, 1)); actions: one action
    batch (see `vwm.data.batch.action_batch`) per round; generators: one per clip. The encoding and round-1 conditioning
    are shared by the ensemble members; each member draws fresh noise for every round.
    """
    t = model.num_frames
    settings.validate(t)
    n_enc = max(settings.n_conds, 1)
    b = frames.shape[0]
    if frames.ndim != 5 or frames.shape[1] < n_enc or frames.shape[2] != 3:
        raise ValueError(f"frames must be (B, n >= {n_enc}, 3, H, W), got shape {tuple(frames.shape)}")
    if len(generators) != b:
        raise ValueError(f"got {len(generators)} generators for a batch of {b} clips; need one per clip")
    if len(actions) != settings.n_rounds:
        raise ValueError(f"got actions for {len(actions)} rounds; n_rounds={settings.n_rounds}")
    dev = placement.device
    first = frames[:, 0].float()
    aug = draw_noise(first.shape[1:], generators) * settings.cond_aug
    with _timed(timings, "encode_s", dev), placement.use(model.first_stage_model):
        z = torch.cat([model.encode_first_stage(frames[i:i + 1, :n_enc].float().to(dev), generator=g)
                       for i, g in enumerate(generators)])
    with _timed(timings, "condition_s", dev):
        c, uc = _conditioning(model, placement, first, first + aug, actions[0], settings.cond_aug, False)
    guider = make_guider(settings.guider, settings.cfg_scale, settings.n_rounds)
    sampler = make_sampler(settings.sampler, settings.n_steps, guider, settings.sigma_min, settings.sigma_max,
                           settings.guidance_sigma_min, settings.final_antithetic)
    latent_shape = (t, *z.shape[2:])
    first_cond = z.new_zeros(b, *latent_shape)
    first_cond[:, :n_enc] = z
    first_mask = torch.zeros(b, t, device=dev)
    first_mask[:, :settings.n_conds] = 1.0
    next_mask = torch.zeros(b, t, device=dev)
    next_mask[:, :OVERLAP] = 1.0
    window = min(CLIP_WINDOW, t)

    def denoise_round(cond, uncond, cond_frame, mask):
        noise = draw_noise(latent_shape, generators).to(dev)
        with _timed(timings, "denoise_s", dev), placement.use(model.model):
            return sampler(model.denoiser, placement.network, noise, cond, uncond, cond_frame=cond_frame,
                           cond_mask=mask, callback=callback)

    members = []
    for _ in range(ensemble):
        sample = denoise_round(c, uc, first_cond, first_mask)
        sample[:, 0] = z[:, 0]
        out = z.new_zeros(b, output_frames(t, settings.n_rounds), *latent_shape[1:])
        out[:, :t] = sample
        for r in range(1, settings.n_rounds):
            with _timed(timings, "clip_decode_s", dev), placement.use(model.first_stage_model):
                pixels = decode_latents(model, sample[:, -window:], window)[:, -OVERLAP]
            with _timed(timings, "condition_s", dev):
                c_r, uc_r = _conditioning(model, placement, pixels, sample[:, -OVERLAP] / model.scale_factor,
                                          actions[r], settings.cond_aug, True)
            cond_frame = z.new_zeros(b, *latent_shape)
            cond_frame[:, :OVERLAP] = sample[:, -OVERLAP:]
            sample = denoise_round(c_r, uc_r, cond_frame, next_mask)
            start = t + (r - 1) * (t - OVERLAP)
            out[:, start:start + t - OVERLAP] = sample[:, OVERLAP:]
        members.append(out)
    return torch.stack(members)


@torch.no_grad()
def decode_rollout(model: DiffusionEngine, latents: torch.Tensor, settings: RolloutSettings,
                   placement: Placement, timings: dict[str, float] | None = None) -> torch.Tensor:
    """Pixels (B, L, 3, H, W) in [-1, 1], on the CPU, of rollout latents (B, L, C, h, w) (overlap decode)."""
    chunk = placement.decode_chunk(settings) or latents.shape[1]
    with _timed(timings, "decode_s", placement.device), placement.use(model.first_stage_model):
        return decode_latents(model, latents, chunk).clamp(-1.0, 1.0).cpu()


@dataclass
class RolloutResult:
    """Latents (B, L, C, h, w), pixels (B, L, 3, H, W) in [-1, 1] on the CPU, and seconds per stage."""

    latents: torch.Tensor
    video: torch.Tensor
    timings: dict[str, float]


def rollout(
    model: DiffusionEngine,
    frames: torch.Tensor,
    actions: Sequence[Mapping[str, torch.Tensor]],
    generators: Sequence[torch.Generator],
    settings: RolloutSettings,
    placement: Placement,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> RolloutResult:
    """Sample and decode one rollout per clip (see `sample_latents` for the arguments)."""
    timings: dict[str, float] = {}
    latents = sample_latents(model, frames, actions, generators, settings, placement, 1, callback, timings)[0]
    video = decode_rollout(model, latents, settings, placement, timings)
    log.info("rollout of %d clip(s) x %d frames: %s", video.shape[0], video.shape[1],
             ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    return RolloutResult(latents=latents, video=video, timings=timings)


def ensemble_reward(latents: torch.Tensor) -> torch.Tensor:
    """Reward per clip, exp(-mean over latents of the unbiased ensemble variance) (vista.md §1.12).

    latents: (E, B, ...) with E >= 2 members. Computed in float64 from deviations to the first member, so an
    ensemble of identical members has variance exactly 0 and reward exactly 1.
    """
    e = latents.shape[0]
    if e < 2:
        raise ValueError(f"ens_size={e} is invalid; allowed: >= 2 (the ensemble variance needs two samples)")
    d = latents.double() - latents[0].double()
    var = ((d.square().sum(0) - d.sum(0).square() / e) / (e - 1)).clamp(min=0.0)
    return torch.exp(-var.flatten(1).mean(1))
