"""The vwm demo: train a small world model on the procedural toy world, export it, and roll it out under
"steer left" and "steer right" from the same start frames; measure which way the generated view moves.

    python scripts/demo.py --out outputs/demo          (what `make demo` runs)

Everything goes through the real command-line tools (train.py, bin_to_st.py, sample.py). Rerunning continues
the same run (`--resume auto`) and redoes the export and the rollouts. Outputs in --out:
  loss.png                     training loss per step
  steer_left/, steer_right/    per start frame: generated.mp4, ground_truth.mp4, comparison.mp4, frames/
  steer_left_vs_right.mp4      the two generated rollouts of each start frame side by side
  summary.json                 final loss, lateral motion of every rollout, the verdict, the action-following
                               score and the PSNR of the generated frames against the toy world's true future
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG = os.path.join(REPO, "configs", "demo", "toyworld.yaml")
HEIGHT = WIDTH = 64
FRAMES = 8
SPEED_MS = 8.0
STEER_DEG = 120.0
TOY_SEED = 1  # sample.py's TOY clips: held out from the training seed 0
GPU_STEPS = 2000  # ~7 minutes on one H200 (0.19 s/step, bound by rendering the toy clips); CPU: the config's
# max_steps (1100, ~10.5 minutes with the rollouts on 2 cores)
START_FRAMES = 16  # held-out start clips; the sign test needs 12 of 16 for p < 0.05 (8 start frames: 7 of 8)
SAMPLING = {"n_steps": 12, "cfg_scale": 3.0, "sigma_min": 4.0, "sigma_max": 80.0}
"""How the demo samples (sample.py flags). The demo model trains at high noise (ln sigma ~ N(1.5, 1.0), the
config), where the actions decide the layout of the future frames; it never learns to remove the last, fine
noise. So the schedule runs from sigma 80 (EDM's default maximum) down to 4, about the median training noise,
and the last step returns the model's clean estimate there, instead of the reference's 700 -> 0.002, whose
low-noise steps the model has barely seen (its frames keep heavy pixel noise and the steering is lost in it).
docs/toyworld.md has the measurements behind these values."""


def run(cmd: list[str]) -> None:
    """Run one of the CLIs, streaming its output; stop the demo if it fails."""
    print("$ " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd), flush=True)
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"demo: step failed with exit code {result.returncode}: {' '.join(cmd)}")


def read_frames(folder: str):
    """The generated frames of one sample (lossless PNGs) as a uint8 (T,3,H,W) array."""
    import numpy as np
    from PIL import Image

    paths = sorted(glob.glob(os.path.join(folder, "frames", "generated_*.png")))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).transpose(0, 3, 1, 2)


def plot_loss(metrics: str, path: str) -> tuple[float, float, int]:
    """Loss curve PNG (raw and smoothed); returns the mean loss of the first and of the last 10 % of steps and
    the number of steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, alpha=0.35, lw=0.8, label="loss per step")
    ax.plot(steps[k - 1:], smooth, lw=2, label=f"moving average ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.set_title("vwm demo: toy-world world model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    n = max(1, len(loss) // 10)
    return float(loss[:n].mean()), float(loss[-n:].mean()), len(loss)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(REPO, "outputs", "demo"))
    p.add_argument("--config", default=CONFIG, help="the model/training config (default: the demo's)")
    p.add_argument("--max_steps", type=int, default=None,
                   help=f"default: the config's on CPU, {GPU_STEPS} on a GPU")
    p.add_argument("--indices", type=int, nargs="+", default=list(range(START_FRAMES)),
                   help=f"TOY start clips (default: 0 to {START_FRAMES - 1})")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    t0 = time.time()

    train = [py, os.path.join(REPO, "train.py"), "--base", args.config, "--logdir", os.path.join(out, "logs"),
             "--name", "toyworld", "--resume", "auto"]
    import torch

    steps = args.max_steps if args.max_steps is not None else (GPU_STEPS if torch.cuda.is_available() else None)
    if steps is not None:
        train += ["--max_steps", str(steps)]
    run(train)
    t_train = time.time() - t0
    run_dir = os.path.join(out, "logs", "toyworld")
    steps = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step-*")))
    export = os.path.join(out, "toyworld.safetensors")
    run([py, os.path.join(REPO, "bin_to_st.py"), steps[-1], export])

    import numpy as np

    t_rollouts = time.time()
    from vwm.data.toyworld import lateral_motion, render_rollout, steering_plan
    from vwm.media import side_by_side, write_mp4

    motions: dict[str, dict[int, dict[str, float]]] = {}
    for name, direction in (("steer_left", 1.0), ("steer_right", -1.0)):
        motions[name] = {}
        # Open-loop driving from each start pose: the actions (ego frame) are the same for every start frame.
        plan = os.path.join(out, f"{name}.json")
        with open(plan, "w") as f:
            json.dump(steering_plan(SPEED_MS, direction * STEER_DEG, seed=TOY_SEED, height=HEIGHT, width=WIDTH,
                                    num_frames=FRAMES, start_index=args.indices[0]), f)
        run([py, os.path.join(REPO, "sample.py"), "--ckpt", export, "--dataset", "TOY", "--toy_seed",
             str(TOY_SEED), "--index", *map(str, args.indices), "--height", str(HEIGHT), "--width", str(WIDTH),
             "--n_frames", str(FRAMES), *(f"--{k}={v}" for k, v in SAMPLING.items()), "--batch_size", "8",
             "--actions_json", plan, "--png", "--save", os.path.join(out, name), "--seed", "0"])
    t_rollouts = time.time() - t_rollouts
    from vwm.eval.action_score import agreement, score_clip
    from vwm.eval.action_validation import toy_intrinsics
    from vwm.eval.psnr import psnr_per_frame

    camera = toy_intrinsics(HEIGHT, WIDTH)
    pairs, scores, truth_scores, psnr = [], {}, {}, []
    for name in ("steer_left", "steer_right"):
        scores[name], truth_scores[name] = [], []
    for index in args.indices:
        videos = {}
        for name, direction in (("steer_left", 1.0), ("steer_right", -1.0)):
            frames = read_frames(os.path.join(out, name, f"toy_{index:06d}"))
            videos[name] = frames.transpose(0, 2, 3, 1)
            truth_clip = render_rollout([SPEED_MS] * FRAMES, [direction * STEER_DEG] * FRAMES, seed=TOY_SEED,
                                        height=HEIGHT, width=WIDTH, start_index=index, num_frames=FRAMES)
            truth = truth_clip.frames
            motions[name][index] = {"generated": lateral_motion(frames), "ground_truth": lateral_motion(truth)}
            commanded = truth_clip.actions["trajectory"].numpy()
            scores[name].append(score_clip(frames, commanded, camera))
            truth_scores[name].append(score_clip(truth.numpy(), commanded, camera))
            psnr.append(psnr_per_frame(frames[1:], truth.numpy()[1:]))  # frame 0 is the given condition frame
        pairs.append(side_by_side(videos["steer_left"], videos["steer_right"], gap=2))
    write_mp4(np.concatenate(pairs, axis=1), os.path.join(out, "steer_left_vs_right.mp4"), fps=4)

    metrics = os.path.join(run_dir, "metrics.jsonl")
    first, last, n_steps = plot_loss(metrics, os.path.join(out, "loss.png"))
    left = [m["generated"] for m in motions["steer_left"].values()]
    right = [m["generated"] for m in motions["steer_right"].values()]
    agree = sum(lv > rv for lv, rv in zip(left, right))
    # one-sided sign test: the chance of at least `agree` of n pairs turning the right way if steering had no effect
    p_value = sum(math.comb(len(left), k) for k in range(agree, len(left) + 1)) / 2 ** len(left)
    follows = p_value < 0.05 and float(np.mean(left)) > float(np.mean(right))
    nan = float("nan")
    finals = {name: [nan if sc.final_est_deg is None else sc.final_est_deg for sc in scores[name]] for name in scores}
    commanded = {name: scores[name][0].final_cmd_deg for name in scores}
    heading_agree = sum(a > b for a, b in zip(finals["steer_left"], finals["steer_right"]))
    following = agreement(scores["steer_left"] + scores["steer_right"])
    following_truth = agreement(truth_scores["steer_left"] + truth_scores["steer_right"])
    psnr_frames = np.mean(psnr, axis=0)
    summary = {
        "steps": n_steps, "loss_first_10pct": first, "loss_last_10pct": last, "sampling": SAMPLING,
        "lateral_motion": motions,
        "measure": "vwm.data.toyworld.lateral_motion: mean horizontal scene shift per frame in image widths, "
                   "positive = scene moves right = camera turns left",
        "mean_generated_left": float(np.mean(left)), "mean_generated_right": float(np.mean(right)),
        "start_frames_where_left_turns_more_left_than_right": f"{agree}/{len(left)}",
        "sign_test_p_value": p_value,
        "follows_steering": follows,
        "action_following": {
            "measure": "vwm.eval.action_score: heading of the camera estimated from the generated frames "
                       "(planar-motion essential matrix on tracked points, toy camera intrinsics) against the "
                       "heading the commanded trajectory implies, degrees, + = left",
            "final_heading_deg": {name: {"commanded": commanded[name], "generated": finals[name]} for name in finals},
            "start_frames_where_left_heads_more_left_than_right": f"{heading_agree}/{len(left)}",
            "generated": following, "ground_truth": following_truth,
        },
        "psnr_db_per_frame": [float(v) for v in psnr_frames],
        "psnr_db_mean": float(psnr_frames.mean()),
        "psnr_measure": "vwm.eval.psnr against the toy world's true future under the same actions, frames 1.., "
                        "averaged over start frames and both steering directions",
        "seconds": round(time.time() - t0, 1), "seconds_training": round(t_train, 1),
        "seconds_rollouts": round(t_rollouts, 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nloss over {n_steps} steps: {first:.3f} (first 10%) -> {last:.3f} (last 10%)")
    print(f"lateral motion of generated rollouts (image widths/frame, + = turning left): "
          f"steer left {np.mean(left):+.4f}, steer right {np.mean(right):+.4f} "
          f"(ground truth {np.mean([m['ground_truth'] for m in motions['steer_left'].values()]):+.4f} / "
          f"{np.mean([m['ground_truth'] for m in motions['steer_right'].values()]):+.4f}); "
          f"left > right on {agree}/{len(left)} start frames (sign test p = {p_value:.3f})")
    def deg(value: float | None) -> str:
        return "n/a" if value is None or not math.isfinite(value) else f"{value:+.1f}"

    print(f"action following (camera heading estimated from the frames vs the commanded trajectory): steer left "
          f"{deg(float(np.nanmean(finals['steer_left'])))} deg (commanded {deg(commanded['steer_left'])}), steer "
          f"right {deg(float(np.nanmean(finals['steer_right'])))} deg (commanded {deg(commanded['steer_right'])}); "
          f"heading error {deg(following['heading_error_deg']).lstrip('+')} deg (ground-truth frames: "
          f"{deg(following_truth['heading_error_deg']).lstrip('+')}); left heads more left than right on "
          f"{heading_agree}/{len(left)} start frames")
    print("PSNR against the true future, frames 1-{}: {} dB (mean {:.2f} dB)".format(
        FRAMES - 1, " ".join(f"{v:.1f}" for v in psnr_frames), psnr_frames.mean()))
    print("the rollouts follow the steering (better than chance, p < 0.05)" if follows else
          "the rollouts do not follow the steering better than chance: more training steps are needed (README)")
    print(f"outputs in {out}: loss.png, steer_left_vs_right.mp4, steer_left/, steer_right/, summary.json "
          f"({time.time() - t0:.0f} s: training {t_train:.0f} s, rollouts {t_rollouts:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
