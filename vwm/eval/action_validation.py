"""Validation of the action-following score on ground truth, where the true motion is known.

    python -m vwm.eval.action_validation toy --clips 64 --frames 8 --height 64 --width 64
    python -m vwm.eval.action_validation nuscenes --data_root data/nuscenes --anno_file
    annos/nuScenes_val.json \
        --limit 500

`toy`: toy-world clips under the exploration policy (a random speed, 4-12 m/s, and a random steering angle
held or ramped over the clip, independent of the road). The true yaw of every frame follows from the bicycle
model that drives the camera (vwm.data.toyworld), so the estimator is checked against it directly ("exact"),
and the score is also computed the way generated clips are scored, from the clip's trajectory annotation
("annotation"). `nuscenes`: real ground-truth clips of an annotation file against their own trajectories
(intrinsics: nominal CAM_FRONT). Prints one JSON object; docs/evaluation.md reports the results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

import numpy as np

from vwm.data.nuscenes import NuScenesSubset
from vwm.data.toyworld import CAMERA, ToyWorldSubset
from vwm.data.toyworld_scene import STEERING_RATIO, WHEELBASE_M
from vwm.defaults import NUM_FRAMES
from vwm.eval.action_score import agreement, score_motion, spearman
from vwm.eval.egomotion import Intrinsics, NUSCENES_CAM_FRONT, estimate_ego_motion


def toy_true_yaw(speeds: np.ndarray, steering_deg: np.ndarray, fps: float) -> np.ndarray:
    """Yaw (deg) of each frame step of a toy-world rollout: the bicycle model's v dt tan(wheel) / wheelbase."""
    wheel = np.radians(np.asarray(steering_deg[:-1], dtype=np.float64) / STEERING_RATIO)
    return np.degrees(np.asarray(speeds[:-1], dtype=np.float64) / fps * np.tan(wheel) / WHEELBASE_M)


def toy_intrinsics(height: int, width: int) -> Intrinsics:
    """The toy-world camera's intrinsics in pixels of a height x width frame."""
    focal, cx, cy = CAMERA.scaled(height, width)
    return Intrinsics(focal, focal, cx, cy)


def validate_toy(clips: int, frames: int, height: int, width: int, seed: int = 7) -> dict:
    """Agreement of the estimate with the exact toy-world yaw and with the trajectory annotations."""
    subset = ToyWorldSubset(frames, height, width, length=clips, seed=seed, policy="explore")
    intrinsics = toy_intrinsics(height, width)
    true_final, est_final, step_errors, scores = [], [], [], []
    for index in range(clips):
        clip = subset.load_clip(index)
        speeds, steering = subset.explore_actions(index)
        truth = toy_true_yaw(speeds, steering, subset.fps)
        motion = estimate_ego_motion(clip.frames.numpy(), intrinsics)
        score = score_motion(motion, clip.actions["trajectory"].numpy(), frames)
        yaw = np.asarray([v if v is not None else np.nan for v in score.yaw_per_frame_deg])
        step_errors.extend(np.abs(yaw - truth)[np.isfinite(yaw)].tolist())
        true_final.append(float(truth.sum()))
        est_final.append(float(np.nansum(yaw)))
        scores.append(score)
    true_final, est_final = np.array(true_final), np.array(est_final)
    return {
        "clips": clips, "frames": frames, "size": [height, width], "seed": seed,
        "exact": {
            "final_heading_mae_deg": float(np.abs(est_final - true_final).mean()),
            "final_heading_true_mean_abs_deg": float(np.abs(true_final).mean()),
            "yaw_step_mae_deg": float(np.mean(step_errors)),
            "final_heading_spearman": spearman(true_final, est_final),
            "final_heading_slope": float((true_final * est_final).sum() / (true_final ** 2).sum()),
            "turn_direction_agreement": float(np.mean(np.sign(np.round(true_final, 6)) == np.sign(est_final))),
        },
        "annotation": agreement(scores),
    }


def validate_nuscenes(data_root: str, anno_file: str, limit: int | None, height: int, width: int,
                      frames: int = NUM_FRAMES) -> dict:
    """Agreement of the estimate on real nuScenes clips with their own trajectories."""
    subset = NuScenesSubset(data_root, anno_file, num_frames=frames, target_height=height, target_width=width,
                            turn_repeat=1, complete_repeat=1, jpeg_draft=False)
    intrinsics = Intrinsics.from_full_frame(NUSCENES_CAM_FRONT, height, width)
    scores = []
    for index in range(min(len(subset), limit or len(subset))):
        clip = subset.load_clip(index)
        if "trajectory" not in clip.actions:
            continue
        motion = estimate_ego_motion(clip.frames.numpy(), intrinsics)
        scores.append(score_motion(motion, clip.actions["trajectory"].numpy(), frames))
    return {"clips": len(scores), "size": [height, width], "annotation": agreement(scores)}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (see the module doc)."""
    p = argparse.ArgumentParser(prog="python -m vwm.eval.action_validation", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="source", required=True)
    toy = sub.add_parser("toy", help="toy-world clips with exactly known motion")
    toy.add_argument("--clips", type=int, default=64)
    toy.add_argument("--frames", type=int, default=8)
    toy.add_argument("--height", type=int, default=64)
    toy.add_argument("--width", type=int, default=64)
    toy.add_argument("--seed", type=int, default=7, help="toy-world seed (the demo trains on 0, samples 1)")
    nus = sub.add_parser("nuscenes", help="real clips of an annotation file")
    nus.add_argument("--data_root", required=True)
    nus.add_argument("--anno_file", required=True)
    nus.add_argument("--limit", type=int, default=None)
    nus.add_argument("--height", type=int, default=576)
    nus.add_argument("--width", type=int, default=1024)
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.source == "toy":
        result = validate_toy(args.clips, args.frames, args.height, args.width, args.seed)
    else:
        result = validate_nuscenes(args.data_root, args.anno_file, args.limit, args.height, args.width)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
