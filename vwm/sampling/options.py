"""What a sampling run is asked to do (`SampleOptions`, the flags of sample.py), its checks, and the rollout
settings it implies."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vwm.data.video import check_target_size
from vwm.defaults import SAMPLING_STEPS, SEED
from vwm.rollout import SIGMA_MAX, SIGMA_MIN, RolloutSettings
from vwm.training.preflight import WEIGHTS_SOURCES

Dataset = Literal["NUSCENES", "IMG", "TOY"]
ACTION_MODES: dict[str, str | None] = {
    "free": None, "traj": "trajectory", "trajectory": "trajectory", "cmd": "command", "command": "command",
    "steer": "steer", "goal": "goal",
}
"""--action values (the reference's names and aliases) -> modality of vwm.actions.MODALITIES (None: none)."""
TOY_CLIPS = 100
"""Clips of the TOY data set (toy-world clips of --toy_seed)."""
DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX = SIGMA_MIN, SIGMA_MAX
"""--sigma_min / --sigma_max defaults: the reference's schedule (vwm.rollout.SIGMA_MIN, SIGMA_MAX)."""
DEFAULT_CKPT = "ckpts/vista.safetensors"
"""--ckpt default: the reference's (VERSION2SPECS['vwm'])."""


@dataclass
class SampleOptions:
    """Everything a sampling run needs (the CLI flags)."""

    ckpt: str = DEFAULT_CKPT
    config: list[str] | None = None
    dataset: Dataset = "NUSCENES"
    data_root: str = "data/nuscenes"
    anno_file: str = "annos/nuScenes_val.json"
    image_dir: str = "image_folder"
    toy_seed: int = 1
    action: str | None = None
    actions_json: str | None = None
    n_rounds: int = 1
    n_frames: int | None = None
    n_conds: int = 1
    n_steps: int = SAMPLING_STEPS
    cfg_scale: float = 2.5
    guider: Literal["vanilla", "linear", "triangle"] | None = None
    sampler: Literal["euler", "heun"] = "euler"
    cond_aug: float = 0.0
    sigma_min: float = DEFAULT_SIGMA_MIN
    sigma_max: float = DEFAULT_SIGMA_MAX
    height: int = 576
    width: int = 1024
    seed: int = SEED
    n_samples: int | None = None
    index: list[int] | None = None
    random_order: bool = False
    save: str = "outputs"
    low_vram: bool = False
    compile: str = "auto"
    fp8: bool = False
    decode_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    cudnn_benchmark: bool = False
    batch_size: int = 1
    decode_chunk: int | None = None
    fps: float = 10.0
    gif: bool = False
    png: bool = False
    reward: bool = False
    ens_size: int = 5
    device: str = "auto"
    dry_run: bool = False


def check_options(opts: SampleOptions) -> None:
    """Validate what needs no model or data; ValueError / FileNotFoundError name the flag, value and rule."""
    try:
        check_target_size(opts.height, opts.width)
    except ValueError as err:
        raise ValueError(f"--{str(err).removeprefix('target_')}") from err
    positive = {"n_rounds": opts.n_rounds, "n_steps": opts.n_steps, "batch_size": opts.batch_size,
                "n_samples": opts.n_samples, "fps": opts.fps}
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name}={value} is invalid; allowed: > 0")
    if not (np.isfinite(opts.sigma_max) and opts.sigma_max > 0):
        raise ValueError(f"--sigma_max={opts.sigma_max} is invalid; allowed: a finite number > 0")
    if not (np.isfinite(opts.sigma_min) and 0 < opts.sigma_min < opts.sigma_max):
        raise ValueError(f"--sigma_min={opts.sigma_min} is invalid; allowed: 0 < sigma_min < --sigma_max "
                         f"({opts.sigma_max:g})")
    if opts.reward and opts.ens_size < 2:
        raise ValueError(f"--ens_size={opts.ens_size} is invalid; allowed: >= 2 (the ensemble variance "
                         "needs two samples)")
    if opts.index is not None and opts.random_order:
        raise ValueError("--random_order orders the whole dataset; it cannot be combined with --index")
    if opts.actions_json is not None:
        if opts.action is not None:
            raise ValueError(f"--action={opts.action} and --actions_json both given; the JSON decides the "
                             "actions, leave --action out")
        if not os.path.isfile(opts.actions_json):
            raise FileNotFoundError(f"--actions_json={opts.actions_json!r} is not an existing file")
    if not os.path.exists(opts.ckpt):
        source = WEIGHTS_SOURCES.get(os.path.basename(opts.ckpt))
        raise FileNotFoundError(f"--ckpt={opts.ckpt!r} does not exist" + (
            f" (default {DEFAULT_CKPT}; download it from {source}, or pass --ckpt)" if source else ""))
    if opts.dataset == "NUSCENES":
        if not os.path.isdir(opts.data_root):
            raise FileNotFoundError(f"--data_root={opts.data_root!r} is not an existing directory")
        if not os.path.isfile(opts.anno_file):
            raise FileNotFoundError(f"--anno_file={opts.anno_file!r} is not an existing file")
    if opts.dataset == "IMG":
        if opts.actions_json is None and ACTION_MODES[opts.action or "free"] is not None:
            raise ValueError(f"--action={opts.action}: --dataset IMG has no ground-truth actions; allowed: "
                             "--action free or --actions_json")
        if not os.path.isdir(opts.image_dir):
            raise FileNotFoundError(f"--image_dir={opts.image_dir!r} is not an existing directory")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else cpu; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name} is invalid: CUDA is not available; allowed: auto, cpu")
    return device


def rollout_settings(opts: SampleOptions) -> RolloutSettings:
    """The vwm.rollout.RolloutSettings of the flags."""
    return RolloutSettings(n_rounds=opts.n_rounds, n_conds=opts.n_conds, n_steps=opts.n_steps,
                           cfg_scale=opts.cfg_scale, guider=opts.guider, sampler=opts.sampler,
                           cond_aug=opts.cond_aug, decode_chunk=opts.decode_chunk, sigma_min=opts.sigma_min,
                           sigma_max=opts.sigma_max)
