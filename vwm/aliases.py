"""The alias layer: what the reference (Vista) calls things, and where they live in vwm.

- `ALIASES`: reference class paths -> vwm classes, with the parameters vwm derives (dropped from configs).
- `PARAM_ALIASES`: per vwm class, config keys passed to the constructor under another name, and reference keys
  the class does not take, each with the reason. Config trees keep the reference keys; construction sees
  vwm's names (`constructor_arguments`), validation accepts the reference's (`vwm.config.config_parameters`).
- `REFERENCE_SUBSETS`: the reference's data-subset names and the paths it hard-codes for them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """Where a reference (Vista) class path lives in vwm, and which of its params vwm derives instead."""

    target: str
    derived: tuple[str, ...] = ()


_R = "vwm.modules.diffusionmodules."
ALIASES: dict[str, Alias] = {
    "vwm.models.diffusion.DiffusionEngine": Alias("vwm.models.engine.DiffusionEngine"),
    f"{_R}video_model.VideoUNet": Alias("vwm.models.video_unet.VideoUNet"),
    f"{_R}wrappers.OpenAIWrapper": Alias("vwm.models.video_unet.UNetWrapper"),
    f"{_R}denoiser.Denoiser": Alias("vwm.diffusion.denoiser.Denoiser", ("num_frames",)),
    f"{_R}denoiser_scaling.VScalingWithEDMcNoise": Alias("vwm.diffusion.denoiser.VScalingWithEDMcNoise"),
    f"{_R}denoiser_scaling.EDMScaling": Alias("vwm.diffusion.denoiser.EDMScaling"),
    f"{_R}denoiser_scaling.VScaling": Alias("vwm.diffusion.denoiser.VScaling"),
    f"{_R}denoiser_scaling.EpsScaling": Alias("vwm.diffusion.denoiser.EpsScaling"),
    f"{_R}loss.StandardDiffusionLoss": Alias("vwm.diffusion.loss.StandardDiffusionLoss", ("num_frames",)),
    f"{_R}loss_weighting.VWeighting": Alias("vwm.diffusion.loss.VWeighting"),
    f"{_R}loss_weighting.EDMWeighting": Alias("vwm.diffusion.loss.EDMWeighting"),
    f"{_R}loss_weighting.EpsWeighting": Alias("vwm.diffusion.loss.EpsWeighting"),
    f"{_R}loss_weighting.UnitWeighting": Alias("vwm.diffusion.loss.UnitWeighting"),
    f"{_R}sigma_sampling.EDMSampling": Alias("vwm.diffusion.noise.EDMSampling", ("num_frames",)),
    f"{_R}discretizer.EDMDiscretization": Alias("vwm.diffusion.noise.EDMDiscretization"),
    f"{_R}sampling.EulerEDMSampler": Alias("vwm.diffusion.sampler.EulerEDMSampler"),
    f"{_R}guiders.VanillaCFG": Alias("vwm.diffusion.guidance.VanillaCFG"),
    f"{_R}guiders.IdentityGuider": Alias("vwm.diffusion.guidance.IdentityGuider"),
    f"{_R}guiders.LinearPredictionGuider": Alias("vwm.diffusion.guidance.LinearPredictionGuider", ("num_frames",)),
    f"{_R}guiders.TrianglePredictionGuider": Alias(
        "vwm.diffusion.guidance.TrianglePredictionGuider", ("num_frames",)
    ),
    f"{_R}model.Encoder": Alias("vwm.models.vae_networks.Encoder"),
    f"{_R}model.Decoder": Alias("vwm.models.vae_networks.Decoder"),
    "vwm.modules.autoencoding.temporal_ae.VideoDecoder": Alias("vwm.models.vae_networks.VideoDecoder"),
    "vwm.modules.autoencoding.regularizers.DiagonalGaussianRegularizer": Alias(
        "vwm.models.autoencoder.DiagonalGaussianRegularizer"
    ),
    "vwm.modules.GeneralConditioner": Alias("vwm.models.conditioner.GeneralConditioner"),
    "vwm.modules.encoders.modules.GeneralConditioner": Alias("vwm.models.conditioner.GeneralConditioner"),
    "vwm.modules.encoders.modules.FrozenOpenCLIPImagePredictionEmbedder": Alias(
        "vwm.models.conditioner.FrozenOpenCLIPImagePredictionEmbedder"
    ),
    "vwm.modules.encoders.modules.FrozenOpenCLIPImageEmbedder": Alias(
        "vwm.models.conditioner.FrozenOpenCLIPImageEmbedder"
    ),
    "vwm.modules.encoders.modules.ConcatTimestepEmbedderND": Alias("vwm.models.conditioner.ConcatTimestepEmbedderND"),
    "vwm.modules.encoders.modules.VideoPredictionEmbedderWithEncoder": Alias(
        "vwm.models.conditioner.VideoPredictionEmbedderWithEncoder"
    ),
    "vwm.lr_scheduler.LambdaLinearScheduler": Alias("vwm.training.lr.LambdaLinearScheduler"),
    "vwm.data.dataset.Sampler": Alias("vwm.data.datamodule.VideoDataModule"),
    "train.ImageLogger": Alias("vwm.training.callbacks.VideoLogger", ("num_frames",)),
}


@dataclass(frozen=True)
class ParamAliases:
    """How the config keys of a vwm class (the reference's schema) differ from its constructor's parameters:
    keys passed under another name, and reference keys the class does not take, each with the reason."""

    renames: Mapping[str, str] = field(default_factory=dict)
    """config key -> constructor parameter."""
    drops: Mapping[str, str] = field(default_factory=dict)
    """config key -> why vwm drops it (accepted in configs, never passed to the constructor)."""
    why: str = ""
    """Why the keys are renamed."""


_BUILT = "the reference's `<name>_config` keys receive built modules, so the parameter is named for the module"
_DDCONFIG = "the reference gives encoder and decoder one shared parameter set (`ddconfig`)"
_VAE_LOSS = ("the VAE's training loss in the reference (torch.nn.Identity in its YAMLs: no parameters, no state); "
             "vwm never trains the VAE")
PARAM_ALIASES: dict[str, ParamAliases] = {
    "vwm.models.engine.DiffusionEngine": ParamAliases(renames={
        "network_config": "network", "denoiser_config": "denoiser", "first_stage_config": "first_stage",
        "conditioner_config": "conditioner", "sampler_config": "sampler", "loss_fn_config": "loss_fn",
        "scheduler_config": "scheduler"}, why=_BUILT + " (optimizer_config stays: it is an unbuilt node)"),
    "vwm.diffusion.denoiser.Denoiser": ParamAliases(renames={"scaling_config": "scaling"}, why=_BUILT),
    "vwm.models.video_unet.VideoUNet": ParamAliases(drops={
        "spatial_transformer_attn_type": "softmax or softmax-xformers in the reference; every attention of vwm "
                                         "runs through SDPA"}),
    "vwm.models.vae_networks.Encoder": ParamAliases(drops={
        "out_ch": f"the decoder's output channels; {_DDCONFIG}"}),
    "vwm.models.vae_networks.Decoder": ParamAliases(drops={
        "in_channels": f"the encoder's input channels; {_DDCONFIG}",
        "double_z": f"the encoder's moments width (mean and log-variance); {_DDCONFIG}"}),
    "vwm.models.autoencoder.AutoencodingEngine": ParamAliases(
        renames={"encoder_config": "encoder", "decoder_config": "decoder", "regularizer_config": "regularizer"},
        drops={"loss_config": _VAE_LOSS}, why=_BUILT),
    "vwm.models.autoencoder.AutoencoderKLModeOnly": ParamAliases(drops={
        "loss_config": _VAE_LOSS,
        "monitor": "the metric the reference's Lightning checkpointing watched when training the VAE"}),
    "vwm.models.conditioner.FrozenOpenCLIPImageEmbedder": ParamAliases(drops={
        "version": "the reference's pretrained-weights tag; vwm never downloads (weights come from a file)"}),
    "vwm.models.conditioner.FrozenOpenCLIPImagePredictionEmbedder": ParamAliases(
        renames={"open_clip_embedding_config": "open_clip"}, why=_BUILT),
    "vwm.models.conditioner.VideoPredictionEmbedderWithEncoder": ParamAliases(
        renames={"encoder_config": "encoder"}, why=_BUILT),
    "vwm.training.lr.LambdaLinearScheduler": ParamAliases(drops={
        "verbosity_interval": "the reference printed the LR factor every N steps; vwm logs the learning rate"}),
    "vwm.training.callbacks.VideoLogger": ParamAliases(drops={
        "log_images_kwargs": "arguments of the reference's log_images (sampler steps, N); vwm samples with the "
                             "model's sampler and max_clips",
        "enable_autocast": "autocast follows the training precision",
        "clamp": "samples are always clamped to [-1, 1]",
        "rescale": "samples are always written as videos from [-1, 1]",
        "log_on_batch_idx": "the frequency always counts optimizer steps"}),
}
"""Per vwm class (and its subclasses): the reference's parameter names and dead keys, absorbed here so the
classes keep honest signatures while reference configs (and ours, which keep the reference schema) load
unchanged. Config trees (and the configs embedded in exports) keep the reference keys; only construction sees
the vwm names."""


def param_aliases(cls: Any) -> ParamAliases:
    """The merged ParamAliases of a class and its bases."""
    renames: dict[str, str] = {}
    drops: dict[str, str] = {}
    for klass in reversed(cls.__mro__ if inspect.isclass(cls) else ()):
        entry = PARAM_ALIASES.get(f"{klass.__module__}.{klass.__qualname__}")
        if entry is not None:
            renames.update(entry.renames)
            drops.update(entry.drops)
    return ParamAliases(renames=renames, drops=drops)


def constructor_arguments(cls: Any, args: Mapping[str, Any], path: str = "<node>") -> dict[str, Any]:
    """A node's arguments under the constructor's names: renamed keys renamed, dropped keys removed."""
    aliases = param_aliases(cls)
    out = {}
    for key, value in args.items():
        if key in aliases.drops:
            log.debug("%s.%s: dropped (%s)", path, key, aliases.drops[key])
            continue
        out[aliases.renames.get(key, key)] = value
    return out


# --------------------------------------------------------------------------------------------------- loading


REFERENCE_SUBSETS: dict[str, tuple[str, dict[str, str]]] = {
    "YouTube": ("vwm.data.opendv.OpenDVSubset",
                {"data_root": "data/YouTube", "anno_file": "annos/YouTube.json"}),
    "NuScenes": ("vwm.data.nuscenes.NuScenesSubset",
                 {"data_root": "data/nuscenes", "anno_file": "annos/nuScenes.json"}),
}
"""The reference's subset names and the data roots / annotation files it hard-codes for them."""
