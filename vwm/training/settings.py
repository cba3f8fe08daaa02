"""The run settings a training config implies, derived once: clip shape, batch, latent size, precision, strategy
and ZeRO stage. The trainer, the dry run, the memory estimate and the callbacks read this object instead of
re-reading the config with their own defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from vwm.config import to_container
from vwm.defaults import NUM_FRAMES, TRAIN_HEIGHT, TRAIN_WIDTH


def zero_stage(strategy: str | None) -> int | None:
    """ZeRO stage of a Lightning strategy name (`deepspeed_stage_N`; plain `deepspeed` is stage 2), None when the
    strategy is not DeepSpeed."""
    name = strategy or "auto"
    if not name.startswith("deepspeed"):
        return None
    return int(name.rsplit("_", 1)[-1]) if name[-1].isdigit() else 2


def block_first_stage(stage: Mapping) -> bool:
    """Whether a first_stage_config node builds a parameter-free block first stage (PixelShuffleAutoencoder,
    BlockDCTAutoencoder: `patch` pixels per latent side, no network, no activations to keep)."""
    return "patch" in (stage.get("params") or {}) or str(stage.get("target", "")).endswith(
        ("PixelShuffleAutoencoder", "BlockDCTAutoencoder"))


def latent_downsample(model_node: Mapping) -> int:
    """Pixels per latent side of the model's first stage (8 for the SD/SVD VAE, `patch` for the block stages)."""
    stage = (model_node.get("params") or {}).get("first_stage_config") or {}
    params = stage.get("params") or {}
    if block_first_stage(stage):
        return int(params.get("patch", 4))
    encoder = (params.get("encoder_config") or {}).get("params") or {}
    return 2 ** (len(encoder.get("ch_mult", [1, 2, 4, 4])) - 1)


@dataclass(frozen=True)
class RunSettings:
    """What a training config sets for one run (per process, per micro-batch)."""

    num_frames: int
    height: int
    width: int
    batch_size: int
    latent_downsample: int
    strategy: str
    zero_stage: int | None
    use_checkpoint: bool
    compile_model: bool
    accumulate_grad_batches: int

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents."""
        return self.height // self.latent_downsample, self.width // self.latent_downsample

    @property
    def latent_pixels_per_clip(self) -> int:
        """frames x h x w of one clip's latents (the throughput monitor's unit)."""
        h, w = self.latent_size
        return self.num_frames * h * w

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RunSettings:
        """The settings of a resolved training config (`model`, `data`, `lightning` sections)."""
        model = dict(to_container(OmegaConf.select(cfg, "model.params")) or {})
        data = dict(to_container(OmegaConf.select(cfg, "data.params")) or {})
        network = (model.get("network_config") or {}).get("params") or {}
        strategy = str(OmegaConf.select(cfg, "lightning.trainer.strategy") or "auto")
        return cls(
            num_frames=int(model.get("num_frames", NUM_FRAMES)),
            height=int(data.get("target_height", TRAIN_HEIGHT)),
            width=int(data.get("target_width", TRAIN_WIDTH)),
            batch_size=int(data.get("batch_size", 1)),
            latent_downsample=latent_downsample(to_container(cfg["model"])),
            strategy=strategy,
            zero_stage=zero_stage(strategy),
            use_checkpoint=bool(network.get("use_checkpoint")),
            compile_model=bool(model.get("compile_model")),
            accumulate_grad_batches=int(OmegaConf.select(cfg, "lightning.trainer.accumulate_grad_batches",
                                                         default=1) or 1),
        )
