"""Procedural ego-view driving world: the embedded default data set (no download, renders on a CPU).

Each clip is generated from (seed, index): a road with lanes, scenery and traffic, and an ego car that a
scripted driver steers through a kinematic bicycle model (vwm/data/toyworld_scene.py), rendered by
vwm/data/toyworld_render.py. Annotations follow the nuScenes schema of reference/vista.md §1.10 (traj, cmd,
speed, angle, goal, z), so the action conditioning is the same as on nuScenes. `python -m vwm.data.toyworld
write ...` writes clips for the real OpenDV and nuScenes readers. Conventions: docs/toyworld.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from vwm.actions import GOAL_IMAGE_SIZE, STEERING_WHEEL_RANGE_DEG, command_from_endpoint, key_frame_indices
from vwm.data.base import Clip
from vwm.data.toyworld_render import Camera, render, to_ego_frame
from vwm.data.toyworld_scene import STEERING_RATIO, World, drive_open_loop, generate_world

CAMERA = Camera()
"""The ego camera (nuScenes CAM_FRONT focal length, 1.5 m high, 1.7 m ahead of the rear axle)."""

Policy = Literal["driver", "explore"]
"""How the ego drives: a lane-keeping driver with manoeuvres, or exploration with road-independent steering."""
SpeedUnit = Literal["m/s", "km/h"]
_SPEED_SCALE: dict[str, float] = {"m/s": 1.0, "km/h": 3.6}


def _annotation(poses: np.ndarray, speeds: np.ndarray, wheel: np.ndarray, frames: list[str],
                speed_unit: str) -> dict:
    keys = key_frame_indices(len(poses))
    x, y = to_ego_frame(poses[0], poses[keys, 0], poses[keys, 1])
    traj = [round(float(c), 4) for pair in zip(x, y) for c in pair]
    u, v, z = (float(c) for c in CAMERA.project(traj[-2], traj[-1], 0.0))
    goal = [round(u, 3), round(v, 3)] if z > 1e-6 else [-1.0, -1.0]
    return {
        "frames": frames,
        "traj": traj,
        "cmd": command_from_endpoint(traj[-2], traj[-1]),
        "speed": [round(float(s) * _SPEED_SCALE[speed_unit], 4) for s in speeds[keys]],
        "angle": [round(math.degrees(float(w)) * STEERING_RATIO, 3) for w in wheel[keys]],
        "goal": goal,
        "z": round(z, 4),
    }


def _actions(anno: dict) -> dict[str, torch.Tensor]:
    """Actions as the nuScenes reader derives them from an annotation (reference/vista.md §1.10)."""
    f32 = torch.float32
    actions = {
        "command": torch.tensor([float(anno["cmd"])], dtype=f32),
        "trajectory": torch.tensor(anno["traj"][2:], dtype=f32),
        "speed": torch.tensor(anno["speed"][1:], dtype=f32),
        "angle": torch.tensor(anno["angle"][1:], dtype=f32) / STEERING_WHEEL_RANGE_DEG,
    }
    (u, v), (width, height) = anno["goal"], GOAL_IMAGE_SIZE
    if anno["z"] > 0 and 0 < u < width and 0 < v < height:
        actions["goal"] = torch.tensor([u / width, v / height], dtype=f32)
    return actions


class ToyWorldSubset:
    """Procedurally rendered driving clips with nuScenes-schema actions, deterministic in (seed, index)."""

    def __init__(self, num_frames: int, target_height: int, target_width: int, *, length: int = 10_000,
                 seed: int = 0, fps: float = 10.0, num_lanes: int = 3, lane_width: float = 3.5,
                 max_vehicles: int = 3, texture: float = 1.0, speed_unit: SpeedUnit = "km/h",
                 policy: Policy = "driver", explore_steering_deg: float = 300.0):
        key_frame_indices(num_frames)
        checks = (
            ("target_height", target_height, target_height >= 8, "an int >= 8"),
            ("target_width", target_width, target_width >= 8, "an int >= 8"),
            ("length", length, length >= 1, "an int >= 1"),
            ("seed", seed, seed >= 0, "an int >= 0"),
            ("fps", fps, fps > 0, "a float > 0"),
            ("num_lanes", num_lanes, 1 <= num_lanes <= 6, "an int in [1, 6]"),
            ("lane_width", lane_width, lane_width > 0, "a float > 0"),
            ("max_vehicles", max_vehicles, max_vehicles >= 0, "an int >= 0"),
            ("texture", texture, 0 <= texture <= 2, "a float in [0, 2]"),
            ("speed_unit", speed_unit, speed_unit in _SPEED_SCALE, f"one of {list(_SPEED_SCALE)}"),
            ("policy", policy, policy in ("driver", "explore"), "'driver' or 'explore'"),
            ("explore_steering_deg", explore_steering_deg, 0 < explore_steering_deg <= STEERING_WHEEL_RANGE_DEG,
             f"a float in (0, {STEERING_WHEEL_RANGE_DEG}]"),
        )
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"ToyWorldSubset: {name}={value!r} is invalid; expected {allowed}")
        self.num_frames, self.target_height, self.target_width = num_frames, target_height, target_width
        self.length, self.seed, self.fps, self.speed_unit = length, seed, fps, speed_unit
        self.policy, self.explore_steering_deg = policy, explore_steering_deg
        self._world_args = (num_lanes, lane_width, max_vehicles, texture)

    def __len__(self) -> int:
        return self.length

    def _world(self, index: int) -> World:
        if not 0 <= index < self.length:
            raise IndexError(f"ToyWorldSubset: index={index} out of range [0, {self.length})")
        return generate_world(self.seed, index, self.num_frames, self.fps, *self._world_args)

    def folder_name(self, index: int) -> str:
        """Frame folder of clip `index` relative to the written data root (see `write_dataset`)."""
        return f"frames/seed{self.seed}_{index:07d}"

    def _frame_paths(self, index: int, num_frames: int) -> list[str]:
        return [f"{self.folder_name(index)}/{i:09d}.jpg" for i in range(num_frames)]

    def annotation(self, index: int) -> dict:
        """Raw nuScenes-schema annotation of clip `index` (frames relative to the written data root)."""
        world = self._world(index)
        return _annotation(world.poses, world.speeds, world.wheel, self._frame_paths(index, self.num_frames),
                           self.speed_unit)

    def explore_actions(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Speeds (m/s) and steering-wheel degrees per frame of clip `index` under the "explore" policy: a speed in
        [4, 12] m/s and a steering angle drawn uniformly in +-explore_steering_deg, held or ramped over the clip,
        independent of the road, so that steering maps directly to how the view moves."""
        rng = np.random.default_rng([self.seed, index, 0xE4])
        speed = np.full(self.num_frames, rng.uniform(4.0, 12.0))
        start, end = rng.uniform(-1.0, 1.0, size=2) * self.explore_steering_deg
        steer = start + (end - start) * np.linspace(0.0, 1.0, self.num_frames) * (rng.random() < 0.5)
        return speed, steer

    def load_clip(self, index: int) -> Clip:
        """Frames uint8 (T, 3, H, W) of clip `index` and its five actions, normalised as nuScenes'."""
        if self.policy == "explore":
            return self.rollout(index, *self.explore_actions(index))
        world = self._world(index)
        times = np.arange(self.num_frames) / self.fps
        frames = render(world.scene, world.poses, times, CAMERA, self.target_height, self.target_width)
        anno = _annotation(world.poses, world.speeds, world.wheel, self._frame_paths(index, self.num_frames),
                           self.speed_unit)
        return Clip(frames=torch.from_numpy(frames), actions=_actions(anno),
                    source=f"toyworld:seed={self.seed}:index={index}")

    def rollout(self, index: int, speeds: Sequence[float], steering: Sequence[float]) -> Clip:
        """Clip driven from the first frame of clip `index` by explicit per-frame speeds (m/s) and
        steering-wheel angles (degrees, positive = left); its actions are those of the driven trajectory."""
        speeds_a, steer_a = np.asarray(speeds, dtype=np.float64), np.asarray(steering, dtype=np.float64)
        if speeds_a.ndim != 1 or steer_a.shape != speeds_a.shape:
            raise ValueError(f"rollout: speeds (shape {speeds_a.shape}) and steering (shape {steer_a.shape}) "
                             "must be 1-D sequences of the same length")
        key_frame_indices(len(speeds_a))
        if not np.all((speeds_a >= 0) & (speeds_a <= 60)):
            raise ValueError(f"rollout: speeds={speeds_a.tolist()} must lie in [0, 60] m/s")
        if not np.all(np.abs(steer_a) <= STEERING_WHEEL_RANGE_DEG):
            raise ValueError(f"rollout: steering={steer_a.tolist()} must lie in [-780, 780] "
                             "steering-wheel degrees")
        world = self._world(index)
        wheel = np.radians(steer_a / STEERING_RATIO)
        poses = drive_open_loop(world.poses[0], speeds_a, wheel, 1.0 / self.fps)
        times = np.arange(len(poses)) / self.fps
        frames = render(world.scene, poses, times, CAMERA, self.target_height, self.target_width)
        anno = _annotation(poses, speeds_a, wheel, [], self.speed_unit)
        return Clip(frames=torch.from_numpy(frames), actions=_actions(anno),
                    source=f"toyworld:seed={self.seed}:index={index}:rollout")


def render_rollout(speeds: Sequence[float], steering: Sequence[float], *, seed: int, height: int, width: int,
                   start_index: int = 0, fps: float = 10.0, num_frames: int | None = None) -> Clip:
    """Ground-truth clip from the first frame of `ToyWorldSubset(num_frames or len(speeds), height, width,
    seed=seed, fps=fps)` clip `start_index`, driven by explicit speeds (m/s) and steering-wheel degrees."""
    subset = ToyWorldSubset(num_frames or len(speeds), height, width, length=start_index + 1, seed=seed,
                            fps=fps)
    return subset.rollout(start_index, speeds, steering)


def steering_plan(speed: float, steering_deg: float, *, seed: int, height: int, width: int, num_frames: int,
                  start_index: int = 0, fps: float = 10.0) -> dict:
    """The five actions, in annotation units (the --actions_json format of sample.py), of driving clip
    `start_index` at a constant speed (m/s) and steering-wheel angle (degrees, positive = left)."""
    clip = render_rollout([speed] * num_frames, [steering_deg] * num_frames, seed=seed, height=height,
                          width=width, start_index=start_index, fps=fps)
    a = {k: v.tolist() for k, v in clip.actions.items()}
    plan = {"command": int(a["command"][0]), "trajectory": a["trajectory"], "speed": a["speed"],
            "angle": [x * STEERING_WHEEL_RANGE_DEG for x in a["angle"]]}
    if "goal" in a:
        plan["goal"] = [a["goal"][0] * GOAL_IMAGE_SIZE[0], a["goal"][1] * GOAL_IMAGE_SIZE[1]]
    return plan


def lateral_motion(frames: torch.Tensor | np.ndarray) -> float:
    """Mean horizontal shift of the scene between consecutive frames, in image widths per frame; positive when
    the scene moves right, i.e. the camera turns or moves left.

    Per frame pair: cross-correlation of the horizontal gradients of the rows from 35 % of the height down
    (horizon, hills, road), summed over rows, peak refined by a parabola. Works on uint8 or float frames in
    any range, rendered or generated (blurry), (T, 3, H, W) with T >= 2."""
    x = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 2 or x.shape[3] < 8:
        raise ValueError(f"lateral_motion: frames of shape {x.shape}; expected (T>=2, 3, H, W>=8)")
    gray = x.astype(np.float64).mean(axis=1)
    factor = max(1, gray.shape[2] // 128)  # area-downsample to <= 255 px wide: resolution-independent, robust
    if factor > 1:
        t, h, w = gray.shape[0], gray.shape[1] // factor, gray.shape[2] // factor
        gray = gray[:, : h * factor, : w * factor].reshape(t, h, factor, w, factor).mean(axis=(2, 4))
    height, width = gray.shape[1:]
    grad = np.diff(gray[:, int(0.35 * height):, :], axis=2)
    grad -= grad.mean(axis=2, keepdims=True)
    grad *= np.hanning(width - 1)
    n = 2 * (width - 1)
    spec = np.fft.rfft(grad, n=n, axis=2)
    corr = np.fft.irfft((np.conj(spec[:-1]) * spec[1:]).sum(axis=1), n=n, axis=1)
    max_lag = max(2, width // 4)
    lags = np.arange(-max_lag, max_lag + 1)
    window = corr[:, lags % n]
    peak = np.clip(window.argmax(axis=1), 1, len(lags) - 2)
    rows = np.arange(len(window))
    left, mid, right = window[rows, peak - 1], window[rows, peak], window[rows, peak + 1]
    denom = left - 2 * mid + right
    offset = np.where(denom < 0, 0.5 * (left - right) / np.where(denom < 0, denom, -1.0), 0.0)
    return float(np.mean(lags[peak] + np.clip(offset, -0.5, 0.5)) / width)


def write_dataset(out: str, num_clips: int, num_frames: int, height: int, width: int, *, seed: int = 0,
                  fps: float = 10.0) -> tuple[str, str]:
    """Write clips as OpenDV frame folders `out/frames/<clip>/%09d.jpg` (JPEG quality 95) with
    `out/annos/opendv.json` ({folder_name, first_frame}) and `out/annos/nuscenes.json` (nuScenes schema,
    frames relative to `out`); returns the two annotation paths."""
    if num_clips < 1:
        raise ValueError(f"write: num_clips={num_clips} must be >= 1")
    subset = ToyWorldSubset(num_frames, height, width, length=num_clips, seed=seed, fps=fps)
    opendv, nuscenes = [], []
    for index in range(num_clips):
        clip, anno = subset.load_clip(index), subset.annotation(index)
        os.makedirs(os.path.join(out, subset.folder_name(index)), exist_ok=True)
        for frame, rel in zip(clip.frames.permute(0, 2, 3, 1).numpy(), anno["frames"]):
            Image.fromarray(frame).save(os.path.join(out, rel), quality=95)
        first = os.path.basename(anno["frames"][0])
        opendv.append({"folder_name": subset.folder_name(index), "first_frame": first})
        nuscenes.append(anno)
    os.makedirs(os.path.join(out, "annos"), exist_ok=True)
    paths = (os.path.join(out, "annos", "opendv.json"), os.path.join(out, "annos", "nuscenes.json"))
    for path, content in zip(paths, (opendv, nuscenes)):
        with open(path, "w") as fh:
            json.dump(content, fh, indent=1)
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m vwm.data.toyworld write --out DIR --num-clips N --num-frames T --height H --width W
    [--seed S] [--fps F]`."""
    parser = argparse.ArgumentParser(prog="python -m vwm.data.toyworld", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write clips for the OpenDV and nuScenes readers")
    write.add_argument("--out", required=True)
    write.add_argument("--num-clips", type=int, required=True)
    write.add_argument("--num-frames", type=int, required=True)
    write.add_argument("--height", type=int, required=True)
    write.add_argument("--width", type=int, required=True)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--fps", type=float, default=10.0)
    args = parser.parse_args(argv)
    paths = write_dataset(args.out, args.num_clips, args.num_frames, args.height, args.width, seed=args.seed,
                          fps=args.fps)
    print(f"wrote {args.num_clips} clips of {args.num_frames} frames at {args.height}x{args.width} under "
          f"{args.out}: {paths[0]}, {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
