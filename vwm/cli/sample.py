"""`sample.py`: action-conditioned driving videos, long rollouts and ensemble rewards from a checkpoint.

    python sample.py --ckpt ckpts/vista.safetensors --dataset NUSCENES --action traj --n_rounds 4
    python sample.py reward --ckpt ckpts/vista.safetensors --dataset NUSCENES --n_samples 100

Flags, output layout and the rollout procedure: docs/sampling.md. This file parses; the run is
`vwm.sampling.run.run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vwm.cli.common import quiet, run_cli
from vwm.defaults import SAMPLING_STEPS, SEED
from vwm.sampling.model import load_model, model_config  # noqa: F401  (re-exported for scripts)
from vwm.sampling.options import (  # noqa: F401  (the sigma defaults are re-exported for scripts)
    ACTION_MODES,
    DEFAULT_CKPT,
    DEFAULT_SIGMA_MAX,
    DEFAULT_SIGMA_MIN,
    TOY_CLIPS,
    SampleOptions,
)
from vwm.sampling.run import run

log = logging.getLogger(__name__)

VISTA_FLAGS: dict[str, str] = {
    "--version": "vwm has no model registry: --ckpt FILE (default ckpts/vista.safetensors) chooses the weights and "
                 "their config comes from the file (or --config)",
}
"""The reference's sample.py flags vwm does not take, with what to use instead (--rand_gen is accepted)."""


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
    p.add_argument("--n_steps", type=int, default=10 if reward else SAMPLING_STEPS, help="sampler steps per round")
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
    p.add_argument("--seed", type=int, default=SEED, help="sample i draws its noise from (seed, i)")
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
    p.add_argument("--decode_dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the VAE decoder's precision (auto: bf16 on CUDA, fp32 elsewhere; fp32 is the reference's): "
                        "bf16 stays within bf16 rounding of the fp32 frames (58 dB PSNR) and decodes a "
                        "25x576x1024 clip in 0.96 s instead of 1.75 s on an H100 (docs/sampling.md)")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="CUDA: let cuDNN time its convolution algorithms for the rollout's fixed shapes at the "
                        "first use: about 0.5 s less per 25x576x1024 rollout on an H100, but the algorithms it "
                        "picks can differ between runs, so the same seed is no longer bit-identical across runs "
                        "(docs/sampling.md)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the plan (config, samples, frames, parameters, weight memory) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a one-line summary; returns the exit code (2 for a user error)."""
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
