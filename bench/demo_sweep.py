"""Run bench/demo_probe.py for several variants of the demo config side by side (one process each, sharing one
GPU) and collect their JSON lines into one file.

    python bench/demo_sweep.py --steps 1400 --out sweep.jsonl [--only demo c32_p2_lr2e-3 ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMB = "model.params.conditioner_config.params.emb_models"
NET = "model.params.network_config.params"
ACTION_EMBEDDERS = range(5, 10)  # command, trajectory, speed, angle, goal in configs/demo/toyworld.yaml
ACTION_FEATURES = 1 + 8 + 4 + 4 + 2

VECTOR = [*(f"{EMB}.{i}.params.add_sequence_dim=False" for i in ACTION_EMBEDDERS),
          f"{NET}.adm_in_channels={768 + 128 * ACTION_FEATURES}", f"{NET}.action_control=False"]
"""Actions as vector conditioning (added to the timestep embedding of every res block) instead of cross-attention."""
SIGMA = "model.params.loss_fn_config.params.sigma_sampler_config.params"
DENOISER = "model.params.denoiser_config.params.scaling_config"


def lr(value: float) -> list[str]:
    return [f"model.base_learning_rate={value}"]


def sigma(p_mean: float, p_std: float, *mixture: tuple[float, float, float]) -> list[str]:
    """ln sigma ~ N(p_mean, p_std^2), or a mixture with further (p_mean, p_std, probability) components."""
    extra = ",".join(f"[{m},{s},{w}]" for m, s, w in mixture)
    return [f"{SIGMA}.p_mean={p_mean}", f"{SIGMA}.p_std={p_std}", f"{SIGMA}.mixture=[{extra}]"]


def edm_scaling(sigma_data: float) -> list[str]:
    """EDM preconditioning with data std sigma_data instead of v-prediction (which is EDM's with 1): the skip path
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) carries less of the noisy input into the denoised estimate."""
    return [f"{DENOISER}.target=vwm.diffusion.denoiser.EDMScaling", f"{DENOISER}.params.sigma_data={sigma_data}"]


def channels(n: int) -> list[str]:
    return [f"{NET}.model_channels={n}", f"{NET}.num_head_channels={n // 2}"]


# Every variant states the settings the sweeps varied (width, noise distribution, learning rate), so it means the
# same whatever the demo config's current values; docs/toyworld.md lists what they gave.
LOW, VISTA, HIGHER, P2 = sigma(-0.5, 1.5), sigma(1.0, 1.6), sigma(1.5, 1.0), sigma(2.0, 0.8)
C64, C32 = channels(64), channels(32)
FRAMES5 = ["model.params.num_frames=5"]
STEER150 = ["data.params.subsets.0.params.explore_steering_deg=150"]
SIMPLE = ["data.params.subsets.0.params.texture=0.0", "data.params.subsets.0.params.max_vehicles=0"]
NO_DYN = ["model.params.loss_fn_config.params.use_additional_loss=False"]
ATTN12 = [f"{NET}.attention_resolutions=[1,2]"]
MIX_LO30 = sigma(1.5, 1.0, (-1.0, 1.0, 0.3))
LR_DECAY = ["model.params.scheduler_config.params.cycle_lengths=[1100]",
            "model.params.scheduler_config.params.f_min=[0.1]"]
"""The learning rate falls linearly to 0.1x over the demo's 1100 CPU steps (after the warm-up)."""

VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "c64_low_lr3e-4": C64 + LOW + lr(3e-4),
    "c64_low_lr1e-3": C64 + LOW + lr(1e-3),
    "c64_low_lr1e-3_vector": C64 + LOW + lr(1e-3) + VECTOR,
    "c64_vista_lr1e-3": C64 + VISTA + lr(1e-3),
    "c64_vista_lr1e-3_vector": C64 + VISTA + lr(1e-3) + VECTOR,
    "c64_vista_lr1e-3_frames5": C64 + VISTA + lr(1e-3) + FRAMES5,
    "c64_vista_lr1e-3_simple": C64 + VISTA + lr(1e-3) + SIMPLE,
    "c64_vista_lr1e-3_attn12": C64 + VISTA + lr(1e-3) + ATTN12,
    "c64_higher_lr1e-3": C64 + HIGHER + lr(1e-3),
    "c64_higher_lr2e-3": C64 + HIGHER + lr(2e-3),
    "c64_p2_lr1e-3": C64 + P2 + lr(1e-3),
    "c32_higher_lr1e-3": C32 + HIGHER + lr(1e-3),
    "c32_higher_lr2e-3": C32 + HIGHER + lr(2e-3),
    "c32_higher_lr3e-3": C32 + HIGHER + lr(3e-3),
    "c32_p2_lr2e-3": C32 + P2 + lr(2e-3),
    "c32_higher_lr2e-3_frames5": C32 + HIGHER + lr(2e-3) + FRAMES5,
    "c32_higher_lr2e-3_steer150": C32 + HIGHER + lr(2e-3) + STEER150,
    "c32_higher_lr2e-3_nodyn": C32 + HIGHER + lr(2e-3) + NO_DYN,
    "c32_higher_lr2e-3_attn12": C32 + HIGHER + lr(2e-3) + ATTN12,
    # sharper frames (issue #15 item 5): part of the training steps at low noise, where the fine detail is resolved,
    # and / or a decaying learning rate; all at the demo's width and learning rate
    "c32_mix_lo15": C32 + sigma(1.5, 1.0, (-1.0, 1.0, 0.15)) + lr(1e-3),
    "c32_mix_lo30": C32 + MIX_LO30 + lr(1e-3),
    "c32_mix_lo50": C32 + sigma(1.5, 1.0, (-1.0, 1.0, 0.5)) + lr(1e-3),
    "c32_mix_vlo30": C32 + sigma(1.5, 1.0, (-2.0, 1.0, 0.3)) + lr(1e-3),
    "c32_mix_mid30": C32 + sigma(1.5, 1.0, (-0.5, 1.2, 0.3)) + lr(1e-3),
    "c32_higher_lr1e-3_decay": C32 + HIGHER + lr(1e-3) + LR_DECAY,
    "c32_mix_lo30_decay": C32 + MIX_LO30 + lr(1e-3) + LR_DECAY,
    "c32_higher_lr1e-3_edm0.5": C32 + HIGHER + lr(1e-3) + edm_scaling(0.5),
    "c32_higher_lr1e-3_edm0.25": C32 + HIGHER + lr(1e-3) + edm_scaling(0.25),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="+", default=None, choices=sorted(VARIANTS))
    p.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every variant")
    p.add_argument("--probe_args", default="", metavar="'FLAGS'",
                   help="demo_probe.py flags for every variant, one string, e.g. '--sigma_min 0.002 "
                   "--sigma_max 700 --cfg_scale 2 --n_steps 25' (the rollout test as before the demo's "
                   "sampler change)")
    args = p.parse_args()
    names = args.only or list(VARIANTS)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    t0 = time.time()
    procs = []
    for name in names:
        # each variant's JSON lines go to their own file as they come: a run cut short keeps what it measured
        log, rows = open(f"{args.out}.{name}.log", "w"), open(f"{args.out}.{name}.jsonl", "w")
        cmd = [sys.executable, os.path.join(REPO, "bench", "demo_probe.py"), "--steps", str(args.steps),
               "--eval_every", str(args.eval_every), "--steer_every_eval", "--tag", name,
               "--indices", *map(str, args.indices), *shlex.split(args.probe_args),
               "--", *VARIANTS[name], *args.extra]
        procs.append((name, subprocess.Popen(cmd, stdout=rows, stderr=log, text=True, env=env), log, rows))
    with open(args.out, "w") as out:
        for name, proc, log, rows in procs:
            proc.wait()
            log.close()
            rows.close()
            with open(rows.name) as f:
                text = f.read()
            out.write(text)
            print(f"{name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
            print(text, end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
