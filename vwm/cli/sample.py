"""`sample.py`: action-conditioned driving videos, long rollouts and ensemble rewards from a checkpoint.

    python sample.py --ckpt ckpts/vista.safetensors --dataset NUSCENES --action traj --n_rounds 4
    python sample.py reward --ckpt ckpts/vista.safetensors --dataset NUSCENES --n_samples 100

Flags, output layout and the rollout procedure: docs/sampling.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

Dataset = Literal["NUSCENES", "IMG", "TOY"]
ACTION_MODES: dict[str, str | None] = {
    "free": None, "traj": "trajectory", "trajectory": "trajectory", "cmd": "command", "command": "command",
    "steer": "steer", "goal": "goal",
}
"""--action values (the reference's names and aliases) -> modality of vwm.actions.MODALITIES (None: none)."""
TOY_CLIPS = 100
"""Clips of the TOY data set (toy-world clips of --toy_seed)."""
GT_PAD_VALUE = 127
"""Grey frames that pad the ground truth of the comparison video beyond the clip's frames."""
DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX = 0.002, 700.0
"""--sigma_min / --sigma_max defaults: the reference's schedule (vwm.rollout.SIGMA_MIN, SIGMA_MAX)."""
DEFAULT_CKPT = "ckpts/vista.safetensors"
"""--ckpt default: the reference's (VERSION2SPECS['vwm'])."""
LAYOUT_CONFIGS = ("configs/inference/vista.yaml", "configs/inference/svd_xt.yaml", "configs/tiny/model.yaml")
"""Shipped model configs tried, in order, for a checkpoint that embeds none (the released vista.safetensors,
svd_xt.safetensors): the first whose tensor names and shapes the checkpoint matches exactly is used."""
VISTA_FLAGS: dict[str, str] = {
    "--version": "vwm has no model registry: --ckpt FILE (default ckpts/vista.safetensors) chooses the weights and "
                 "their config comes from the file (or --config)",
}
"""The reference's sample.py flags vwm does not take, with what to use instead (--rand_gen is accepted)."""


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
    n_steps: int = 50
    cfg_scale: float = 2.5
    guider: Literal["vanilla", "linear", "triangle"] | None = None
    sampler: Literal["euler", "heun"] = "euler"
    cond_aug: float = 0.0
    sigma_min: float = DEFAULT_SIGMA_MIN
    sigma_max: float = DEFAULT_SIGMA_MAX
    height: int = 576
    width: int = 1024
    seed: int = 23
    n_samples: int | None = None
    index: list[int] | None = None
    random_order: bool = False
    save: str = "outputs"
    low_vram: bool = False
    compile: str = "auto"
    fp8: bool = False
    batch_size: int = 1
    decode_chunk: int | None = None
    fps: float = 10.0
    gif: bool = False
    png: bool = False
    reward: bool = False
    ens_size: int = 5
    device: str = "auto"
    dry_run: bool = False


def parser(reward: bool = False) -> argparse.ArgumentParser:
    """The sample.py argument parser (`reward=True`: the `sample.py reward` subcommand's defaults)."""
    p = argparse.ArgumentParser(
        prog="sample.py reward" if reward else "sample.py",
        description="Ensemble reward exp(-mean ensemble variance) of a world model." if reward else
        "Generate videos with a world model; `sample.py reward ...` estimates rewards (docs/sampling.md).")
    p.add_argument("--ckpt", default=DEFAULT_CKPT,
                   help=f"weights (default {DEFAULT_CKPT}, as in the reference): a vwm safetensors export (carries its "
                   "config), the released vista.safetensors / svd_xt.safetensors (config found from their layout), "
                   ".bin, .ckpt or a DeepSpeed checkpoint dir")
    p.add_argument("--config", nargs="+", metavar="YAML",
                   help="model config(s); overrides the config embedded in the checkpoint")
    p.add_argument("--dataset", choices=["NUSCENES", "IMG", "TOY"], default="NUSCENES")
    p.add_argument("--data_root", default="data/nuscenes", help="NUSCENES: root of the annotation's paths")
    p.add_argument("--anno_file", default="annos/nuScenes_val.json", help="NUSCENES: annotation JSON")
    p.add_argument("--image_dir", default="image_folder", help="IMG: folder of start images (jpg/png)")
    p.add_argument("--toy_seed", type=int, default=1, help=f"TOY: world seed of its {TOY_CLIPS} clips")
    p.add_argument("--action", choices=list(ACTION_MODES), default=None,
                   help="ground-truth action shown to the model (default: free; reward: traj)")
    p.add_argument("--actions_json", metavar="FILE",
                   help="custom actions in annotation units: one object, or a list with one per round")
    p.add_argument("--n_rounds", type=int, default=1, help="autoregressive rounds")
    p.add_argument("--n_frames", type=int, default=None, help="frames per round (must be the model's)")
    p.add_argument("--n_conds", type=int, default=1, help="ground-truth condition frames of round 1 (0-3)")
    p.add_argument("--n_steps", type=int, default=10 if reward else 50, help="sampler steps per round")
    p.add_argument("--cfg_scale", type=float, default=2.5, help="guidance scale (1: no guidance)")
    p.add_argument("--guider", choices=["vanilla", "linear", "triangle"], default=None,
                   help="default: vanilla for one round, triangle for several")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--cond_aug", type=float, default=0.0, help="noise std added to the condition frame")
    p.add_argument("--sigma_min", type=float, default=DEFAULT_SIGMA_MIN,
                   help="last noise level before the final step, which returns the model's estimate at it "
                   f"(default {DEFAULT_SIGMA_MIN:g}, the reference's; raise it for a model trained only at "
                   "higher noise, e.g. the demo's)")
    p.add_argument("--sigma_max", type=float, default=DEFAULT_SIGMA_MAX,
                   help=f"first noise level of the schedule (default {DEFAULT_SIGMA_MAX:g}, the reference's)")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--seed", type=int, default=23, help="sample i draws its noise from (seed, i)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--n_samples", type=int, default=None, help="number of clips (default: all)")
    which.add_argument("--index", type=int, nargs="+", default=None, help="these dataset indices only")
    p.add_argument("--random_order", action="store_true", help="a seeded permutation instead of 0, 1, 2, ...")
    p.add_argument("--rand_gen", action="store_true",
                   help="accepted for the reference's commands, where it meant sequential order: vwm's default "
                   "(the reference's default random order never ended; use --random_order for a seeded one)")
    p.add_argument("--debug", action="store_true", help="full tracebacks for errors (also VWM_DEBUG=1)")
    p.add_argument("--save", default="outputs", help="output directory")
    p.add_argument("--low_vram", action="store_true",
                   help="only the module in use on the GPU, small decode windows, bf16 UNet")
    p.add_argument("--batch_size", type=int, default=1, help="clips sampled together")
    p.add_argument("--decode_chunk", type=int, default=None,
                   help="frames per VAE decode window (default: the model's; low_vram: 6)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of the written videos")
    p.add_argument("--gif", action="store_true", help="also write the generated video as a gif")
    p.add_argument("--png", action="store_true", help="also write every generated frame as a PNG")
    p.add_argument("--reward", action="store_true", default=reward, help="estimate the ensemble reward")
    p.add_argument("--ens_size", type=int, default=5, help="reward ensemble size (>= 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the UNet's layers (auto: on CUDA; about a minute of compilation per "
                        "resolution, then faster steps)")
    p.add_argument("--fp8", action="store_true",
                   help="the UNet's large linear layers as FP8 products (GPUs of compute capability 8.9+: Ada, "
                        "Hopper); faster, at a small fidelity cost (docs/sampling.md)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the plan (config, samples, frames, parameters, weight memory) and exit")
    return p


# ---------------------------------------------------------------------------------------------- checks


def check_options(opts: SampleOptions) -> None:
    """Validate what needs no model or data; ValueError / FileNotFoundError name the flag, value and rule."""
    from vwm.data.video import check_target_size

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
        from vwm.training.preflight import WEIGHTS_SOURCES

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


def rollout_settings(opts: SampleOptions) -> Any:
    """The vwm.rollout.RolloutSettings of the flags."""
    from vwm.rollout import RolloutSettings

    return RolloutSettings(n_rounds=opts.n_rounds, n_conds=opts.n_conds, n_steps=opts.n_steps,
                           cfg_scale=opts.cfg_scale, guider=opts.guider, sampler=opts.sampler,
                           cond_aug=opts.cond_aug, decode_chunk=opts.decode_chunk, sigma_min=opts.sigma_min,
                           sigma_max=opts.sigma_max)


# ------------------------------------------------------------------------------------------------ model


def model_config(opts: SampleOptions) -> tuple[Any, str]:
    """(model config, where it came from): --config, else the config embedded in a vwm safetensors export."""
    from omegaconf import OmegaConf

    from vwm.checkpoint import read_config_metadata
    from vwm.config import load_config, resolve_aliases, validate

    if opts.config:
        return load_config(opts.config), "--config " + " ".join(opts.config)
    embedded = None
    if opts.ckpt.endswith(".safetensors") and os.path.isfile(opts.ckpt):
        from safetensors import safe_open

        with safe_open(opts.ckpt, framework="pt", device="cpu") as f:
            embedded = read_config_metadata(f.metadata() or {})
    if embedded is None:
        return layout_config(opts.ckpt)
    cfg = OmegaConf.create(embedded)
    resolve_aliases(cfg)
    validate(cfg)
    return cfg, f"embedded in {opts.ckpt}"


def layout_config(ckpt: str) -> tuple[Any, str]:
    """The shipped config (LAYOUT_CONFIGS) whose tensor names and shapes a config-less checkpoint matches, as for
    the released vista.safetensors; an error naming --config otherwise."""
    from vwm.config import build_model, load_config
    from vwm.resources import find_config

    shapes = None
    if ckpt.endswith(".safetensors") and os.path.isfile(ckpt):
        from safetensors import safe_open

        with safe_open(ckpt, framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    tried = []
    for name in LAYOUT_CONFIGS if shapes is not None else ():
        path = find_config(name)
        if not os.path.isfile(path):
            continue
        cfg = load_config(path)
        expected = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()
                    if not k.startswith("model_ema.")}
        if expected == shapes:
            log.warning("--ckpt %s carries no config; its tensors match %s exactly: using it (--config chooses "
                        "another)", ckpt, name)
            return cfg, f"{name} (matches the layout of {ckpt})"
        tried.append(name)
    raise ValueError(f"--ckpt={ckpt!r} carries no model config (safetensors metadata 'vwm_config', written by "
                     "bin_to_st.py)" + (f" and matches none of {tried}" if tried else "") +
                     "; pass --config with the model config it was trained with, e.g. "
                     "--config configs/inference/vista.yaml")


def configured_frames(cfg: Any) -> int:
    """The model's num_frames from its config (the DiffusionEngine default when the config omits it)."""
    import inspect

    from vwm.models.engine import DiffusionEngine

    default = inspect.signature(DiffusionEngine.__init__).parameters["num_frames"].default
    return int((cfg["model"].get("params") or {}).get("num_frames", default))


def load_model(opts: SampleOptions, cfg: Any) -> Any:
    """Build the model of `cfg` on the CPU and load the checkpoint strictly (EMA weights when present)."""
    from vwm.checkpoint import load_weights, read_state_dict
    from vwm.config import build_model

    state, _ = read_state_dict(opts.ckpt)
    if cfg.model.params.get("compile_model"):
        cfg.model.params.compile_model = False  # a training setting (exports embed it); see --compile
    model = build_model(cfg)
    load_weights(model, state, allow_missing=(), use_ema_weights=True, name=opts.ckpt)
    return model


def describe_model(cfg: Any, opts: SampleOptions, device: torch.device) -> dict:
    """Parameter counts (built on the meta device) and the weight memory the device holds at once."""
    from vwm.config import build_model

    meta = build_model(cfg, device="meta")
    counts = {name: sum(p.numel() for p in getattr(meta, name).parameters())
              for name in ("model", "conditioner", "first_stage_model")}
    unet_bytes = 2 if device.type == "cuda" else 4
    weight_bytes = [counts["model"] * unet_bytes, counts["conditioner"] * 4, counts["first_stage_model"] * 4]
    held = max(weight_bytes) if opts.low_vram else sum(weight_bytes)
    return {"parameters": counts, "weights_gib_on_device": round(held / 2**30, 3)}


# ------------------------------------------------------------------------------------------------- data


@dataclass
class Item:
    """One start of a rollout: condition frames, ground truth (if any), available actions, origin."""

    frames: torch.Tensor
    gt: torch.Tensor | None
    actions: dict[str, torch.Tensor]
    source: str


class Source:
    """The --dataset as a list of Items at the target size."""

    def __init__(self, opts: SampleOptions, num_frames: int):
        self.kind = opts.dataset
        self.size = (opts.height, opts.width)
        if opts.dataset == "NUSCENES":
            from vwm.data.nuscenes import NuScenesSubset

            self.subset = NuScenesSubset(opts.data_root, opts.anno_file, num_frames=num_frames,
                                         target_height=opts.height, target_width=opts.width, turn_repeat=1,
                                         complete_repeat=1, jpeg_draft=False)
        elif opts.dataset == "TOY":
            from vwm.data.toyworld import ToyWorldSubset

            self.subset = ToyWorldSubset(num_frames, opts.height, opts.width, length=TOY_CLIPS,
                                         seed=opts.toy_seed)
        else:
            from vwm.data.video import IMAGE_EXTENSIONS

            names = sorted(n for n in os.listdir(opts.image_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                raise ValueError(f"--image_dir={opts.image_dir!r} holds no image; allowed extensions: "
                                 f"{', '.join(IMAGE_EXTENSIONS)}")
            self.images = [os.path.join(opts.image_dir, n) for n in names]

    def __len__(self) -> int:
        return len(self.images) if self.kind == "IMG" else len(self.subset)

    def load(self, index: int) -> Item:
        """Item `index` (frames uint8 (T or 1, 3, H, W))."""
        if self.kind != "IMG":
            clip = self.subset.load_clip(index)
            return Item(clip.frames, clip.frames, dict(clip.actions), clip.source)
        from vwm.data.video import decode_image

        image = decode_image(self.images[index], *self.size, draft=False)
        return Item(torch.tensor(image).permute(2, 0, 1)[None].contiguous(), None, {}, self.images[index])


def select_indices(opts: SampleOptions, length: int) -> list[int]:
    """Dataset indices to sample: --index, else the first --n_samples of 0..N-1 or of a seeded permutation."""
    if opts.index is not None:
        bad = [i for i in opts.index if not 0 <= i < length]
        if bad:
            raise ValueError(f"--index {bad} out of range; allowed: 0 to {length - 1} ({opts.dataset} has "
                             f"{length} items)")
        return list(opts.index)
    n = length if opts.n_samples is None else opts.n_samples
    if n > length:
        raise ValueError(f"--n_samples={n} is invalid; allowed: <= {length} ({opts.dataset} has {length} "
                         "items)")
    order = np.random.default_rng(opts.seed).permutation(length) if opts.random_order else np.arange(length)
    return [int(i) for i in order[:n]]


def round_actions(opts: SampleOptions, items: Sequence[Item], plan: list[dict] | None
                  ) -> tuple[list[dict], list[list[str]]]:
    """Per-round action batches (the --actions_json plan, else each clip's ground truth of the --action
    modality, the same every round) and, per item, the actions its modality lacks."""
    from vwm.rollout import action_batch, select_modality

    if plan is not None:
        return [action_batch([r] * len(items)) for r in plan], [[] for _ in items]
    chosen = [select_modality(item.actions, ACTION_MODES[opts.action or "free"]) for item in items]
    return [action_batch([a for a, _ in chosen])] * opts.n_rounds, [m for _, m in chosen]


def condition_frames(items: Sequence[Item], n: int) -> torch.Tensor:
    """(B, n, 3, H, W) in [-1, 1]: each item's first n frames (a single start image repeated)."""
    from vwm.data.video import to_unit_range

    frames = [it.frames.repeat(n, 1, 1, 1) if len(it.frames) == 1 else it.frames[:n] for it in items]
    return torch.stack([to_unit_range(f) for f in frames])


# ---------------------------------------------------------------------------------------------- outputs


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss_process"


def write_outputs(folder: str, video: torch.Tensor, gt: torch.Tensor | None, opts: SampleOptions) -> dict:
    """Write the generated, ground-truth and comparison videos (+ gif, pngs) of one sample; return names."""
    from vwm.media import side_by_side, to_uint8_frames, write_gif, write_mp4, write_pngs

    os.makedirs(folder, exist_ok=True)
    generated = to_uint8_frames(video)
    files = {"generated": "generated.mp4"}
    write_mp4(generated, os.path.join(folder, files["generated"]), fps=opts.fps)
    if opts.gif:
        files["gif"] = "generated.gif"
        write_gif(generated, os.path.join(folder, files["gif"]), fps=opts.fps)
    if opts.png:
        files["pngs"] = "frames/"
        write_pngs(generated, os.path.join(folder, "frames"), prefix="generated")
    if gt is not None:
        real = to_uint8_frames(gt)
        files["ground_truth"] = "ground_truth.mp4"
        write_mp4(real, os.path.join(folder, files["ground_truth"]), fps=opts.fps)
        pad = np.full((max(0, len(generated) - len(real)), *real.shape[1:]), GT_PAD_VALUE, np.uint8)
        files["comparison"] = "comparison.mp4"
        comparison = side_by_side(np.concatenate([real, pad]), generated)
        write_mp4(comparison, os.path.join(folder, files["comparison"]), fps=opts.fps)
    return files


def _shown_actions(actions: dict[str, torch.Tensor], i: int) -> dict[str, list[float]]:
    """The model features of the actions sample i of a batch shows the model."""
    from vwm.actions import ACTION_KEYS

    mask = actions["action_mask"][i]
    return {k: actions[k][i].tolist() for j, k in enumerate(ACTION_KEYS) if bool(mask[j])}


def _write_rewards(path: str, records: list[dict], opts: SampleOptions) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "dataset", "index", "reward", "ens_size", "n_steps", "actions"])
        for r in records:
            writer.writerow([r["name"], r["dataset"], r["index"], repr(r["reward"]), opts.ens_size,
                             opts.n_steps, r["actions"]["from"]])


# -------------------------------------------------------------------------------------------------- run


def _sample_batch(model: Any, placement: Any, opts: SampleOptions, batch: list[int], items: list[Item],
                  actions: list[dict]) -> tuple[torch.Tensor, list[float] | None, dict[str, float]]:
    """(video (B, L, 3, H, W) in [-1, 1], rewards or None, seconds per stage) of one batch of clips."""
    from tqdm import tqdm

    from vwm.rollout import decode_rollout, ensemble_reward, sample_generator, sample_latents

    settings = rollout_settings(opts)
    frames = condition_frames(items, max(opts.n_conds, 1))
    generators = [sample_generator(opts.seed, i) for i in batch]
    ensemble = opts.ens_size if opts.reward else 1
    timings: dict[str, float] = {}
    with tqdm(total=opts.n_steps * opts.n_rounds * ensemble, desc="denoising", unit="step", leave=False,
              file=sys.stderr) as bar:
        latents = sample_latents(model, frames, actions, generators, settings, placement, ensemble,
                                 lambda _: bar.update(1), timings)
    video = decode_rollout(model, latents[0], settings, placement, timings)
    return video, (ensemble_reward(latents).tolist() if opts.reward else None), timings


def run(opts: SampleOptions) -> dict:
    """Sample every selected clip, write its outputs under opts.save and return the run summary."""
    from tqdm import tqdm

    from vwm.models.engine import step_seed
    from vwm.rollout import Placement, load_action_plan, output_frames

    check_options(opts)
    device = resolve_device(opts.device)
    cfg, cfg_source = model_config(opts)
    num_frames = configured_frames(cfg)
    if opts.n_frames is not None and opts.n_frames != num_frames:
        raise ValueError(f"--n_frames={opts.n_frames} is invalid; allowed: {num_frames}, the frame count the "
                         "model was trained with (longer videos: --n_rounds)")
    rollout_settings(opts).validate(num_frames)
    plan_actions = None if opts.actions_json is None else load_action_plan(opts.actions_json, opts.n_rounds)
    source = Source(opts, num_frames)
    indices = select_indices(opts, len(source))
    plan = {"config": cfg_source, "device": str(device), "samples": len(indices),
            "frames_per_video": output_frames(num_frames, opts.n_rounds),
            "settings": dataclasses.asdict(opts)}
    if opts.dry_run:
        return {**plan, **describe_model(cfg, opts, device)}
    model = load_model(opts, cfg)
    assert model.num_frames == num_frames, (model.num_frames, num_frames)
    compile_unet = opts.compile == "on" or (opts.compile == "auto" and device.type == "cuda")
    placement = Placement(model, device, low_vram=opts.low_vram, compile_unet=compile_unet, fp8=opts.fp8)
    os.makedirs(opts.save, exist_ok=True)
    records, started = [], time.perf_counter()
    for first in tqdm(range(0, len(indices), opts.batch_size), desc="batches", unit="batch", file=sys.stderr):
        batch = indices[first:first + opts.batch_size]
        names = [f"{opts.dataset.lower()}_{i:06d}" for i in batch]
        items = [source.load(i) for i in batch]
        actions, missing = round_actions(opts, items, plan_actions)
        for name, lacks in zip(names, missing):
            if lacks:
                log.warning("%s: the clip has no %s; the model sees it as absent", name, ", ".join(lacks))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        video, rewards, timings = _sample_batch(model, placement, opts, batch, items, actions)
        peak, peak_kind = _peak_memory(device)
        for j, (index, name) in enumerate(zip(batch, names)):
            folder = os.path.join(opts.save, name)
            record = {
                "name": name, "dataset": opts.dataset, "index": index, "source": items[j].source,
                "seed": opts.seed, "sample_seed": step_seed(opts.seed, index),
                "frames": plan["frames_per_video"],
                "actions": {"from": "json" if opts.actions_json else f"dataset:{opts.action or 'free'}",
                            "missing": missing[j], "rounds": [_shown_actions(a, j) for a in actions]},
                "files": write_outputs(folder, video[j], items[j].gt, opts), "batch": names,
                "timings_s": {k: round(v, 4) for k, v in timings.items()},
                "peak_memory_gib": round(peak, 3), "peak_memory_kind": peak_kind, "device": str(device),
                "config": cfg_source, "settings": dataclasses.asdict(opts),
            }
            if rewards is not None:
                record.update(reward=rewards[j], ens_size=opts.ens_size)
            with open(os.path.join(folder, "sample.json"), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            records.append(record)
    if opts.reward:
        _write_rewards(os.path.join(opts.save, "rewards.csv"), records, opts)
    outputs = [{"name": r["name"], **({"reward": r["reward"]} if opts.reward else {})} for r in records]
    summary = {**plan, "seconds": round(time.perf_counter() - started, 3), "outputs": outputs}
    with open(os.path.join(opts.save, "run.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a one-line summary; returns the exit code (2 for a user error)."""
    import vwm  # noqa: F401  (torchvision shim before Lightning / open_clip)
    from vwm.cli.common import quiet, run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    reward = bool(argv) and argv[0] == "reward"
    prog = "sample.py reward" if reward else "sample.py"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet()
    return run_cli(prog, lambda a: _main(a, reward), argv[1:] if reward else argv)


def _main(argv: list[str], reward: bool) -> int:
    flag = next((a.partition("=")[0] for a in argv if a.partition("=")[0] in VISTA_FLAGS), None)
    if flag is not None:
        raise ValueError(f"{flag} is not a vwm flag: {VISTA_FLAGS[flag]}")
    args = parser(reward).parse_args(argv)
    if args.action is None and args.actions_json is None:
        args.action = "traj" if reward else "free"
    if args.rand_gen:
        log.info("--rand_gen: sequential order, vwm's default")
    values = {k: v for k, v in vars(args).items() if k not in ("rand_gen", "debug")}
    opts = SampleOptions(**values)
    summary = run(opts)
    if opts.dry_run:
        print(json.dumps(summary, indent=1))
        return 0
    rewards = [o["reward"] for o in summary["outputs"] if "reward" in o]
    extra = f", mean reward {sum(rewards) / len(rewards):.6f}" if rewards else ""
    print(f"wrote {len(summary['outputs'])} sample(s) of {summary['frames_per_video']} frames to {opts.save} "
          f"in {summary['seconds']:.1f} s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
