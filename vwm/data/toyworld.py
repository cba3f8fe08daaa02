"""Procedural ego-view driving world: the embedded default data set (no download, renders on a CPU).

Each clip is generated from (seed, index): a road with lanes, scenery and traffic, and an ego car that a
scripted driver (cruise, accelerate, brake, stop, keep lane through a curve, change lane) steers with a
pure-pursuit controller through a kinematic bicycle model. Annotations follow the nuScenes schema of
reference/vista.md §1.10 (traj, cmd, speed, angle, goal, z), so the action conditioning is the same as on
nuScenes. `python -m vwm.data.toyworld write ...` writes clips for the real OpenDV and nuScenes readers.
Camera, renderer and conventions: vwm/data/toyworld_render.py and docs/toyworld.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from vwm.actions import GOAL_IMAGE_SIZE, STEERING_WHEEL_RANGE_DEG, command_from_endpoint, key_frame_indices
from vwm.data.base import Clip
from vwm.data.toyworld_render import VERGE_M, Camera, Road, Scene, render, to_ego_frame

WHEELBASE_M = 2.7
"""Distance between the axles of the bicycle model; the ego origin is the rear axle."""
STEERING_RATIO = 15.0
"""Steering-wheel degrees per front-wheel degree. `angle` is the steering-wheel angle, positive = left."""
MAX_WHEEL_RAD = 0.6
"""Front-wheel angle limit of the driver policy (516 steering-wheel degrees)."""
CAMERA = Camera()
"""The ego camera (nuScenes CAM_FRONT focal length, 1.5 m high, 1.7 m ahead of the rear axle)."""

Policy = Literal["driver", "explore"]
"""How the ego drives: a lane-keeping driver with manoeuvres, or exploration with road-independent steering."""
SpeedUnit = Literal["m/s", "km/h"]
_SPEED_SCALE: dict[str, float] = {"m/s": 1.0, "km/h": 3.6}
_MANEUVERS: dict[str, float] = {
    "cruise": 0.2, "accelerate": 0.1, "brake": 0.1, "stop": 0.1,
    "curve_left": 0.125, "curve_right": 0.125, "lane_left": 0.125, "lane_right": 0.125,
}
_ROAD_S0, _ROAD_S1, _ROAD_STEP = -60.0, 900.0, 0.5


@dataclass
class _World:
    scene: Scene
    poses: np.ndarray  # (T, 3) policy ego poses (x, y, yaw); poses[0] is every clip's start
    speeds: np.ndarray  # (T,) m/s
    wheel: np.ndarray  # (T,) front-wheel angle, rad, positive = left


def _advance(pose: np.ndarray, speed: float, wheel: float, dt: float) -> np.ndarray:
    """Exact kinematic bicycle step (rear-axle reference) at constant speed and front-wheel angle."""
    x, y, yaw = pose
    dist, k = speed * dt, math.tan(wheel) / WHEELBASE_M
    if abs(k * dist) < 1e-9:
        return np.array([x + dist * math.cos(yaw), y + dist * math.sin(yaw), yaw])
    yaw1 = yaw + k * dist
    return np.array([x + (math.sin(yaw1) - math.sin(yaw)) / k, y - (math.cos(yaw1) - math.cos(yaw)) / k,
                     yaw1])


def _drive_open_loop(start: np.ndarray, speeds: np.ndarray, wheel: np.ndarray, dt: float) -> np.ndarray:
    poses = [start]
    for v, w in zip(speeds[:-1], wheel[:-1]):
        poses.append(_advance(poses[-1], float(v), float(w), dt))
    return np.stack(poses)


def _drive_policy(road: Road, start: np.ndarray, speeds: np.ndarray, lane_plan: tuple[float, ...], dt: float):
    """Pure pursuit of the planned lateral offset d(t) = d0 + delta * smoothstep((t - t0) / dur)."""
    d0, delta, t0, dur = lane_plan
    poses, wheel, pose, s_hint = [], [], start, 0.0
    for k, v in enumerate(speeds):
        poses.append(pose)
        s_e, _ = road.project(pose[:1], pose[1:2], s_hint - 10.0, s_hint + 10.0)
        s_hint = float(s_e[0])
        look = max(4.0, 0.8 * float(v))
        ramp = np.clip((k * dt + look / max(float(v), 1.0) - t0) / dur, 0, 1)
        tx, ty = road.point(s_hint + look, d0 + delta * ramp * ramp * (3 - 2 * ramp))
        lx, ly = to_ego_frame(pose, tx, ty)
        pursuit = math.atan(2 * ly * WHEELBASE_M / (lx * lx + ly * ly))
        wheel.append(float(np.clip(pursuit, -MAX_WHEEL_RAD, MAX_WHEEL_RAD)))
        pose = _advance(pose, float(v), wheel[-1], dt)
    return np.stack(poses), np.array(wheel)


def _speed_profile(rng: np.random.Generator, maneuver: str, times: np.ndarray) -> np.ndarray:
    if maneuver == "accelerate":
        return np.minimum(rng.uniform(0.5, 6.0) + rng.uniform(1.5, 3.5) * times, 20.0)
    if maneuver == "brake":
        return np.maximum(rng.uniform(8.0, 16.0) - rng.uniform(2.0, 5.0) * times, 0.0)
    if maneuver == "stop":
        v0 = rng.uniform(0.2, 1.0) * (rng.random() < 0.5)
        return np.maximum(v0 - v0 * v0 / 1.2 * times, 0.0)  # stops within 0.6 m
    base = rng.uniform(5.0, 15.0) if maneuver == "cruise" else rng.uniform(5.0, 14.0)
    period, phase = rng.uniform(2.0, 6.0), rng.uniform(0, 2 * math.pi)
    return base * (1 + 0.06 * np.sin(2 * math.pi * times / period + phase))


def _turn_curvature(travel: float, lateral: float) -> float:
    """Curvature of the arc from the origin (heading +x) whose point at arc length `travel` lies `lateral`
    aside (at most 1/12 m^-1 and 2 rad of turn)."""
    lo, hi = 1e-6, min(1 / 12, 2.0 / travel)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if (1 - math.cos(mid * travel)) / mid < lateral else (lo, mid)
    return lo


def _road(rng: np.random.Generator, window_kappa: float, travel: float, num_lanes: int,
          lane_width: float) -> Road:
    """Random straights and curves, with curvature `window_kappa` where the ego drives, smoothed over 16 m."""
    s = _ROAD_S0 + _ROAD_STEP * np.arange(int((_ROAD_S1 - _ROAD_S0) / _ROAD_STEP) + 1)
    kappa, pos = np.zeros_like(s), _ROAD_S0
    while pos < _ROAD_S1:
        length = rng.uniform(25.0, 110.0)
        bend = 0.0 if rng.random() < 0.4 else rng.choice([-1.0, 1.0]) * rng.uniform(1 / 350, 1 / 70)
        kappa[(s >= pos) & (s < pos + length)] = bend
        pos += length
    # the ego's bend: 9-25 m either side of its path, turning at most about 2 rad in all
    margin = float(np.clip((2.0 / max(abs(window_kappa), 1e-9) - travel) / 2, 9.0, 25.0))
    kappa[(s >= -margin) & (s < travel + margin)] = window_kappa
    half = 16
    box = np.ones(2 * half + 1) / (2 * half + 1)
    kappa = np.convolve(np.pad(kappa, half, mode="edge"), box, mode="valid")
    i0 = int(round(-_ROAD_S0 / _ROAD_STEP))
    heading = np.cumsum(kappa) * _ROAD_STEP
    heading -= heading[i0]
    x, y = np.cumsum(np.cos(heading)) * _ROAD_STEP, np.cumsum(np.sin(heading)) * _ROAD_STEP
    return Road(_ROAD_S0, _ROAD_STEP, x - x[i0], y - y[i0], heading, kappa, num_lanes, lane_width)


@functools.lru_cache(maxsize=8)
def _noise_table(seed: int, size: int = 256) -> np.ndarray:
    """Periodic pink-ish noise, zero mean, clipped to [-1, 1]."""
    rng = np.random.default_rng([seed, 0x7E47])
    freq = np.fft.fftfreq(size)
    radius = np.hypot(freq[:, None], freq[None, :])
    radius[0, 0] = 1.0
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) / radius * np.exp(-((radius / 0.3) ** 2))
    spectrum[0, 0] = 0.0
    table = np.real(np.fft.ifft2(spectrum))
    return np.clip(table / (2.5 * table.std()), -1, 1).astype(np.float32)


def _hills(rng: np.random.Generator, base_deg: float, amp_deg: float, n: int = 4096) -> np.ndarray:
    """tan(elevation) of a distant silhouette over n azimuths: 24 harmonics with 1/k amplitudes."""
    spectrum = np.zeros(n // 2 + 1, dtype=np.complex128)
    spectrum[1:25] = rng.standard_normal(24) / np.arange(1, 25) * np.exp(2j * math.pi * rng.random(24))
    wave = np.fft.irfft(spectrum, n)
    elev = np.maximum(base_deg + amp_deg * wave / np.abs(wave).max(), 0.05)
    return np.tan(np.radians(elev)).astype(np.float32)


def _scenery(rng: np.random.Generator, road: Road, seed: int, texture: float) -> dict:
    hw = road.half_width
    posts_s = np.arange(-20.0, 420.0, 25.0) + rng.uniform(0, 25.0)
    post_d = hw + 0.7 * VERGE_M
    post_xy = np.concatenate([np.stack(road.point(posts_s, side * post_d), 1) for side in (-1, 1)])
    n_trees = rng.integers(20, 50)
    tree_s = rng.uniform(-20.0, 420.0, n_trees)
    tree_d = rng.choice([-1.0, 1.0], n_trees) * (hw + VERGE_M + rng.uniform(2.0, 30.0, n_trees))
    tree_xy = np.stack(road.point(tree_s, tree_d), 1)
    crown_w, trunk_h = rng.uniform(2.0, 4.5, n_trees), rng.uniform(1.2, 2.4, n_trees)
    crown_top = trunk_h + rng.uniform(2.5, 5.0, n_trees)
    green = np.array([0.13, 0.27, 0.11]) * rng.uniform(0.75, 1.25, (n_trees, 1))
    n_posts = len(post_xy)
    xy = np.concatenate([post_xy, tree_xy, tree_xy])
    box = np.concatenate([
        np.tile([0.14, 0.0, 1.0], (n_posts, 1)),
        np.stack([np.full(n_trees, 0.35), np.zeros(n_trees), trunk_h + 0.5], 1),
        np.stack([crown_w, trunk_h, crown_top], 1),
    ])
    colour = np.concatenate(
        [np.tile([0.92, 0.92, 0.88], (n_posts, 1)), np.tile([0.3, 0.22, 0.14], (n_trees, 1)), green])
    rounded = np.concatenate([np.zeros(n_posts + n_trees, bool), np.ones(n_trees, bool)])
    haze = np.array([0.78, 0.84, 0.9]) * rng.uniform(0.95, 1.05)
    sky = np.array([0.33, 0.52, 0.85]) * rng.uniform(0.85, 1.1, 3)
    grass = np.array([0.28, 0.46, 0.17]) * rng.uniform(0.8, 1.2, 3)
    far_hill, near_hill = haze + 0.35 * (np.array([0.36, 0.45, 0.55]) - haze), np.array([0.22, 0.33, 0.2])
    f32 = np.float32
    return dict(
        prop_xy=xy, prop_box=box, prop_colour=colour.astype(f32), prop_round=rounded,
        sky=sky.astype(f32), haze=haze.astype(f32), grass=grass.astype(f32),
        verge=(np.array([0.55, 0.5, 0.42]) * rng.uniform(0.9, 1.1)).astype(f32),
        asphalt=(np.array([0.33, 0.33, 0.35]) * rng.uniform(0.8, 1.15)).astype(f32),
        paint=np.array([0.95, 0.95, 0.92], f32),
        hills=[(_hills(rng, 2.5, 2.0), far_hill.astype(f32)), (_hills(rng, 0.8, 0.7), near_hill.astype(f32))],
        noise=_noise_table(seed), texture=texture, fog_m=rng.uniform(150.0, 260.0),
    )


_CAR_COLOURS = [[0.7, 0.1, 0.1], [0.1, 0.2, 0.6], [0.85, 0.85, 0.85], [0.1, 0.1, 0.1], [0.8, 0.65, 0.1]]


def _vehicles(rng: np.random.Generator, road: Road, ego_s: np.ndarray, times: np.ndarray,
              max_vehicles: int) -> dict:
    """Vehicles at constant speed in random lanes that stay at least 6 m ahead of the ego throughout."""
    rows = []
    for _ in range(rng.integers(0, max_vehicles + 1)):
        for _attempt in range(8):
            length, width = rng.uniform(3.8, 5.0), rng.uniform(1.7, 2.0)
            s0, speed = rng.uniform(10.0, 90.0), rng.uniform(3.0, 16.0)
            lane = int(rng.integers(road.num_lanes))
            colour = rng.choice(_CAR_COLOURS)
            if np.all(s0 + speed * times - ego_s > length / 2 + 6.0):
                rows.append((s0, road.lane_centre(lane), speed, length, width, *colour))
                break
    arr = np.array(rows, dtype=np.float64).reshape(-1, 8)
    return dict(vehicle_s=arr[:, 0], vehicle_d=arr[:, 1], vehicle_speed=arr[:, 2], vehicle_size=arr[:, 3:5],
                vehicle_colour=arr[:, 5:].astype(np.float32))


def _generate(seed: int, index: int, num_frames: int, fps: float, num_lanes: int, lane_width: float,
              max_vehicles: int, texture: float) -> _World:
    """The world of clip (seed, index) and the driver policy's trajectory through it."""
    rng = np.random.default_rng([seed, index])
    dt = 1.0 / fps
    times = np.arange(num_frames) * dt
    maneuver = str(rng.choice(list(_MANEUVERS), p=list(_MANEUVERS.values())))
    speeds = _speed_profile(rng, maneuver, times)
    travel = max(float(speeds[:-1].sum() * dt), 1.0)
    lane = int(rng.integers(num_lanes))
    delta, t0, dur = 0.0, 0.0, 1.0
    if maneuver in ("lane_left", "lane_right") and num_lanes > 1:
        side = 1 if maneuver == "lane_left" else -1
        lane = int(rng.integers(num_lanes - 1)) + (side < 0)
        delta, t0 = side * lane_width, rng.uniform(0, 0.15) * times[-1]
        dur = max(rng.uniform(0.5, 0.8) * times[-1], dt)
    d0 = -num_lanes * lane_width / 2 + (lane + 0.5) * lane_width + rng.uniform(-0.2, 0.2)
    if maneuver in ("curve_left", "curve_right"):
        lateral = rng.uniform(2.6, 5.0)
        needed = 12.0 * math.acos(1 - min(lateral / 12.0, 1.0))
        if travel < needed:
            speeds, travel = speeds * (needed / travel), needed
        k_lane = _turn_curvature(travel, lateral) * (1 if maneuver == "curve_left" else -1)
        window_kappa = k_lane / (1 + k_lane * d0)
    else:
        window_kappa = rng.uniform(-1, 1) * min(1 / 150, 1.6 / travel**2)
    road = _road(rng, window_kappa, travel, num_lanes, lane_width)
    start = np.array([*road.point(0.0, d0), 0.0])
    poses, wheel = _drive_policy(road, start, speeds, (d0, delta, t0, dur), dt)
    ego_s, _ = road.project(poses[:, 0], poses[:, 1], -20.0, travel + 40.0)
    traffic = _vehicles(rng, road, ego_s, times, max_vehicles)
    scene = Scene(road=road, **traffic, **_scenery(rng, road, seed, texture))
    return _World(scene=scene, poses=poses, speeds=speeds, wheel=wheel)


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

    def _world(self, index: int) -> _World:
        if not 0 <= index < self.length:
            raise IndexError(f"ToyWorldSubset: index={index} out of range [0, {self.length})")
        return _generate(self.seed, index, self.num_frames, self.fps, *self._world_args)

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
        poses = _drive_open_loop(world.poses[0], speeds_a, wheel, 1.0 / self.fps)
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
