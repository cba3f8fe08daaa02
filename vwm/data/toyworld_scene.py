"""The procedural driving world's content (vwm.data.toyworld): each clip's road, scenery and traffic, and the ego
car that a scripted driver (cruise, accelerate, brake, stop, keep lane through a curve, change lane) steers with
a pure-pursuit controller through a kinematic bicycle model. Everything is a pure function of (seed, index,
settings). The camera and renderer are in vwm/data/toyworld_render.py; see docs/toyworld.md.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from vwm.data.toyworld_render import VERGE_M, Road, Scene, to_ego_frame

WHEELBASE_M = 2.7
"""Distance between the axles of the bicycle model; the ego origin is the rear axle."""
STEERING_RATIO = 15.0
"""Steering-wheel degrees per front-wheel degree. `angle` is the steering-wheel angle, positive = left."""
MAX_WHEEL_RAD = 0.6
"""Front-wheel angle limit of the driver policy (516 steering-wheel degrees)."""

_MANEUVERS: dict[str, float] = {
    "cruise": 0.2, "accelerate": 0.1, "brake": 0.1, "stop": 0.1,
    "curve_left": 0.125, "curve_right": 0.125, "lane_left": 0.125, "lane_right": 0.125,
}
_ROAD_S0, _ROAD_S1, _ROAD_STEP = -60.0, 900.0, 0.5


@dataclass
class World:
    """One clip's scene and the driver policy's trajectory through it."""

    scene: Scene
    poses: np.ndarray  # (T, 3) policy ego poses (x, y, yaw); poses[0] is every clip's start
    speeds: np.ndarray  # (T,) m/s
    wheel: np.ndarray  # (T,) front-wheel angle, rad, positive = left


def advance(pose: np.ndarray, speed: float, wheel: float, dt: float) -> np.ndarray:
    """Exact kinematic bicycle step (rear-axle reference) at constant speed and front-wheel angle."""
    x, y, yaw = pose
    dist, k = speed * dt, math.tan(wheel) / WHEELBASE_M
    if abs(k * dist) < 1e-9:
        return np.array([x + dist * math.cos(yaw), y + dist * math.sin(yaw), yaw])
    yaw1 = yaw + k * dist
    return np.array([x + (math.sin(yaw1) - math.sin(yaw)) / k, y - (math.cos(yaw1) - math.cos(yaw)) / k,
                     yaw1])


def drive_open_loop(start: np.ndarray, speeds: np.ndarray, wheel: np.ndarray, dt: float) -> np.ndarray:
    """Poses (T, 3) from `start` under per-frame speeds (m/s) and front-wheel angles (rad), no controller."""
    poses = [start]
    for v, w in zip(speeds[:-1], wheel[:-1]):
        poses.append(advance(poses[-1], float(v), float(w), dt))
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
        pose = advance(pose, float(v), wheel[-1], dt)
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


def generate_world(seed: int, index: int, num_frames: int, fps: float, num_lanes: int, lane_width: float,
              max_vehicles: int, texture: float) -> World:
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
    return World(scene=scene, poses=poses, speeds=speeds, wheel=wheel)
