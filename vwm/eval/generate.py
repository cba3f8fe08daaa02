"""Generating the evaluation clips: one rollout round per clip from its first frame(s), with the protocol's
sampler and actions, and noise drawn from (seed, clip index) so that a clip does not depend on the batch, the
shard or the run it is generated in (vwm.rollout)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vwm import rollout as ro
from vwm.data.base import Clip
from vwm.data.batch import action_batch
from vwm.data.video import to_unit_range
from vwm.eval.protocol import Protocol
from vwm.models.engine import DiffusionEngine
from vwm.sampling.actions import select_modality

ACTION_MODALITY: dict[str, str | None] = {
    "free": None, "traj": "trajectory", "trajectory": "trajectory", "cmd": "command", "command": "command",
    "steer": "steer", "goal": "goal",
}
"""--action values (sample.py's) -> modality of vwm.actions.MODALITIES."""


def settings_of(protocol: Protocol) -> ro.RolloutSettings:
    """The one-round rollout settings of a protocol."""
    return ro.RolloutSettings(n_rounds=1, n_conds=protocol.n_conds, n_steps=protocol.n_steps,
                              cfg_scale=protocol.cfg_scale, guider=protocol.guider, sampler=protocol.sampler,
                              sigma_min=protocol.sigma_min, sigma_max=protocol.sigma_max)


class InPlacePlacement(ro.Placement):
    """A Placement for a model that is being trained: it neither moves, casts nor freezes the model (the
    callback switches eval mode and EMA weights around the sampling itself); the UNet runs in its own dtype."""

    def __init__(self, model: DiffusionEngine):  # noqa: super().__init__ would prepare the model in place
        self.model = model
        self.device = model.device
        self.low_vram = False
        self.unet_dtype = next(model.model.parameters()).dtype

    @contextlib.contextmanager
    def use(self, module: nn.Module) -> Iterator[None]:
        yield


@dataclass
class Generated:
    """uint8 videos (B, T, 3, H, W) and the seconds per stage of the batch."""

    videos: torch.Tensor
    timings: dict[str, float]


def shown_actions(clips: Sequence[Clip], action: str) -> dict[str, torch.Tensor]:
    """The action batch a protocol's --action shows the model (each clip's ground truth of that modality)."""
    if action not in ACTION_MODALITY:
        raise ValueError(f"action={action!r} is invalid; allowed: {', '.join(ACTION_MODALITY)}")
    modality = ACTION_MODALITY[action]
    return action_batch([select_modality(c.actions, modality)[0] for c in clips])


def generate(model: DiffusionEngine, placement: ro.Placement, clips: Sequence[Clip], indices: Sequence[int],
             protocol: Protocol) -> Generated:
    """One generated clip per input clip, conditioned on its first `n_conds` frames (uint8, on the CPU)."""
    settings = settings_of(protocol)
    n = max(protocol.n_conds, 1)
    frames = torch.stack([to_unit_range(c.frames[:n]) for c in clips])
    generators = [ro.sample_generator(protocol.seed, i) for i in indices]
    result = ro.rollout(model, frames, [shown_actions(clips, protocol.action)], generators, settings, placement)
    videos = ((result.video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Generated(videos=videos, timings=result.timings)
