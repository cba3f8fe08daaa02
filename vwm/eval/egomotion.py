"""Camera ego-motion of a driving video from its frames alone: per-frame yaw of a forward-looking camera.

For each pair of consecutive frames:

1. Correspondences: a regular grid of points tracked with pyramidal Lucas-Kanade (OpenCV), kept where the
   backward track returns within `fb_tolerance_px` of the start.
2. A planar-motion essential matrix. A car's camera yaws about the vertical axis and moves in the ground
   plane, so with camera axes x right, y down, z forward, X2 = R_y(psi) (X1 - c), c = (-sin lam, 0, cos lam):
   psi is the yaw (+ = left), lam the direction of the camera's translation (+ = left), and E = R_y(psi) [c]_x
   (Hartley & Zisserman eq. 9.1 with t = -R c). Two unknowns instead of the general essential matrix's five.
3. A robust fit: (psi, lam) minimise the truncated Sampson error sum_i min(d_i^2, tau^2) (MSAC) over a coarse
   grid, refined twice on finer grids. The search keeps the non-holonomic constraint of a forward-moving car
   whose camera sits ahead of the rear axle: the camera moves sideways the way it turns, by lam / psi between
   1/2 and 4 (`MotionSettings.lateral_per_yaw`, up to `slip_deg`). This removes the rotation /
   sideways-translation ambiguity (bas-relief) of narrow, small or blurry frames, where a right yaw with a
   left slide explains the flow almost as well as a left yaw.

Rotation is observable from one camera; the translation's scale is not, so speed is not estimated. Integrating
psi over the pairs gives the heading of every frame relative to frame 0 (vwm.eval.action_score compares it
with the commanded trajectory). Pure rotation (a standing car turning its view) still determines psi: every
lam then fits, and psi is the value that makes the flow a rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vwm.actions import GOAL_IMAGE_SIZE

NUSCENES_CAM_FRONT = (1266.4, 1266.4, 816.3, 491.5)
"""(fx, fy, cx, cy) of nuScenes CAM_FRONT in its 1600x900 image (the calibrations of the fleet differ by < 1 %;
the annotation files carry no intrinsics)."""
PROCESS_WIDTH = 384
"""Frames wider than this are area-downsampled to it before tracking (the estimate does not need more)."""


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels of the frames they describe."""

    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_full_frame(cls, full: tuple[float, float, float, float], height: int, width: int,
                        full_size: tuple[int, int] = GOAL_IMAGE_SIZE) -> Intrinsics:
        """Intrinsics of a `height`x`width` frame made from a `full_size` (W, H) image the way the data readers
        make it: centre-crop to the target aspect ratio, then resize."""
        fx, fy, cx, cy = full
        full_w, full_h = full_size
        scale = max(width / full_w, height / full_h)
        off_u, off_v = (full_w - width / scale) / 2, (full_h - height / scale) / 2
        return cls(fx * scale, fy * scale, (cx - off_u) * scale, (cy - off_v) * scale)

    def scaled(self, factor: float) -> Intrinsics:
        """Intrinsics of the frames resized by `factor` (pixel-centre convention)."""
        return Intrinsics(self.fx * factor, self.fy * factor, (self.cx + 0.5) * factor - 0.5,
                          (self.cy + 0.5) * factor - 0.5)


@dataclass
class EgoMotion:
    """Per consecutive-frame-pair estimates: yaw (deg, + = left), translation direction (deg, + = left), the
    number of tracked points and the fraction of them within the inlier threshold."""

    yaw_deg: np.ndarray
    lateral_deg: np.ndarray
    tracked: np.ndarray
    inlier_fraction: np.ndarray

    def heading_deg(self) -> np.ndarray:
        """Heading of every frame relative to frame 0 (T,), degrees, + = left: the integrated yaw."""
        return np.concatenate([[0.0], np.cumsum(self.yaw_deg)])


@dataclass(frozen=True)
class MotionSettings:
    """Knobs of the estimator (defaults validated on the toy world, docs/evaluation.md)."""

    grid_columns: int = 40
    """Tracked points per image row of the grid (rows: same spacing)."""
    fb_tolerance_px: float = 0.5
    """Forward-backward track error allowed, in processing pixels."""
    inlier_px: float = 1.0
    """Truncation of the Sampson error (MSAC threshold), in processing pixels."""
    max_yaw_deg: float = 20.0
    """Largest yaw between two frames searched."""
    max_lateral_deg: float = 60.0
    """Largest angle between the camera's translation and its optical axis searched."""
    lateral_per_yaw: tuple[float, float] = (0.5, 4.0)
    """Range of lam / psi. The rear axle moves along the chord, at psi / 2; a camera a metres ahead of it adds
    a psi sideways over a step of s metres, so lam / psi = 1/2 + a / s: 2.5 at 10 m/s with a 1.7 m offset
    (nuScenes CAM_FRONT, the toy world) at 12 frames/s, 4 at 6 m/s. Below that speed the true ratio is larger,
    but the translation is then too small to move the yaw estimate; a wider band (12 was tried) lets the fit
    trade yaw for sideways motion on small frames (toy 64x64: large turns under-read by 30 %)."""
    slip_deg: float = 1.0
    """Tolerance of that band (sideslip, calibration), degrees."""


def _gray(frame: np.ndarray) -> np.ndarray:
    """uint8 (3, H, W) RGB -> uint8 (H, W) luma."""
    rgb = frame.astype(np.float32)
    return np.clip(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] + 0.5, 0, 255).astype(np.uint8)


def _prepare(frames: np.ndarray, intrinsics: Intrinsics) -> tuple[list[np.ndarray], Intrinsics]:
    import cv2

    gray = [_gray(f) for f in frames]
    width = gray[0].shape[1]
    if width <= PROCESS_WIDTH:
        return gray, intrinsics
    factor = PROCESS_WIDTH / width
    size = (PROCESS_WIDTH, max(8, round(gray[0].shape[0] * factor)))
    return [cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in gray], intrinsics.scaled(factor)


def track(a: np.ndarray, b: np.ndarray, settings: MotionSettings) -> tuple[np.ndarray, np.ndarray]:
    """Grid points of `a` and where they are in `b` ((N, 2) float32 each), forward-backward consistent."""
    import cv2

    h, w = a.shape
    step = max(1.0, w / settings.grid_columns)
    margin = 2.0
    xs = np.arange(margin, w - margin, step)
    ys = np.arange(margin, h - margin, step)
    p0 = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.float32)
    window = int(np.clip(round(w / 24) * 2 + 1, 9, 31))
    levels = int(np.clip(math.log2(max(w, 16) / 16), 1, 4))
    params = dict(winSize=(window, window), maxLevel=levels,
                  criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    p1, ok1, _ = cv2.calcOpticalFlowPyrLK(a, b, p0, None, **params)
    back, ok2, _ = cv2.calcOpticalFlowPyrLK(b, a, p1, None, **params)
    good = (ok1.ravel() == 1) & (ok2.ravel() == 1) & (np.linalg.norm(back - p0, axis=1) < settings.fb_tolerance_px)
    good &= (p1[:, 0] >= 0) & (p1[:, 0] < w) & (p1[:, 1] >= 0) & (p1[:, 1] < h)
    return p0[good], p1[good]


def _truncated_cost(psi: np.ndarray, lam: np.ndarray, u1: np.ndarray, v1: np.ndarray, u2: np.ndarray,
                    v2: np.ndarray, tau2: float) -> np.ndarray:
    """sum_i min(Sampson_i^2, tau2) for each hypothesis (psi, lam) (radians; normalised image coordinates).

    With E = R_y(psi) [c]_x and c = (-sin lam, 0, cos lam), E has four non-zero entries: E01 = A, E10 = c_z,
    E12 = -c_x, E21 = B with A = -cos(psi) c_z + sin(psi) c_x, B = sin(psi) c_z + cos(psi) c_x; so
    x2^T E x1 = A u2 v1 + v2 (c_z u1 - c_x) + B v1 and the Sampson denominator is
    (A v1)^2 + (c_z u1 - c_x)^2 + (c_z v2)^2 + (A u2 + B)^2.
    """
    cp, sp = np.cos(psi)[:, None], np.sin(psi)[:, None]
    cxv, czv = -np.sin(lam)[:, None], np.cos(lam)[:, None]
    a = -cp * czv + sp * cxv
    b = sp * czv + cp * cxv
    mid = czv * u1 - cxv
    num = a * u2 * v1 + v2 * mid + b * v1
    den = (a * v1) ** 2 + mid ** 2 + (czv * v2) ** 2 + (a * u2 + b) ** 2
    return np.minimum(num * num / np.maximum(den, 1e-18), tau2).sum(axis=1)


def _feasible(psi: np.ndarray, lam: np.ndarray, ratio: tuple[float, float], slip: float) -> np.ndarray:
    """The non-holonomic band: lam has the sign of psi and ratio[0] |psi| - slip <= |lam| <= ratio[1] |psi| + slip
    (|lam| <= slip when psi = 0)."""
    side = lam * np.where(psi < 0, -1.0, 1.0)
    return (side >= ratio[0] * np.abs(psi) - slip) & (np.abs(lam) <= ratio[1] * np.abs(psi) + slip)


def fit_planar_motion(p0: np.ndarray, p1: np.ndarray, intrinsics: Intrinsics,
                      settings: MotionSettings = MotionSettings()) -> tuple[float, float, float]:
    """(yaw deg, translation direction deg, inlier fraction) of the planar motion taking p0 to p1 (pixels)."""
    if len(p0) < 8:
        return float("nan"), float("nan"), 0.0
    u1, v1 = (p0[:, 0] - intrinsics.cx) / intrinsics.fx, (p0[:, 1] - intrinsics.cy) / intrinsics.fy
    u2, v2 = (p1[:, 0] - intrinsics.cx) / intrinsics.fx, (p1[:, 1] - intrinsics.cy) / intrinsics.fy
    u1, v1, u2, v2 = (c.astype(np.float64)[None] for c in (u1, v1, u2, v2))
    tau2 = (settings.inlier_px / intrinsics.fx) ** 2
    slip = math.radians(settings.slip_deg)
    max_psi, max_lam = math.radians(settings.max_yaw_deg), math.radians(settings.max_lateral_deg)
    psi_grid = np.linspace(-max_psi, max_psi, int(round(2 * settings.max_yaw_deg / 0.25)) + 1)
    lam_grid = np.linspace(-max_lam, max_lam, int(round(2 * settings.max_lateral_deg / 2.0)) + 1)
    best = (0.0, 0.0)
    for stage in range(3):
        if stage:
            dpsi, dlam = 1.5 * (psi_grid[1] - psi_grid[0]), 1.5 * (lam_grid[1] - lam_grid[0])
            psi_grid = best[0] + np.linspace(-dpsi, dpsi, 13)
            lam_grid = np.clip(best[1] + np.linspace(-dlam, dlam, 13), -max_lam, max_lam)
        psi, lam = (g.ravel() for g in np.meshgrid(psi_grid, lam_grid, indexing="ij"))
        keep = _feasible(psi, lam, settings.lateral_per_yaw, slip)
        psi, lam = psi[keep], lam[keep]
        cost = np.concatenate([_truncated_cost(psi[i:i + 2048], lam[i:i + 2048], u1, v1, u2, v2, tau2)
                               for i in range(0, len(psi), 2048)])
        i = int(np.argmin(cost))
        best = (float(psi[i]), float(lam[i]))
    final = _truncated_cost(np.array([best[0]]), np.array([best[1]]), u1, v1, u2, v2, tau2)
    inliers = 1.0 - float(final[0]) / (tau2 * u1.shape[1]) if u1.shape[1] else 0.0
    return math.degrees(best[0]), math.degrees(best[1]), inliers


def estimate_ego_motion(frames: np.ndarray, intrinsics: Intrinsics,
                        settings: MotionSettings = MotionSettings()) -> EgoMotion:
    """Ego-motion of every consecutive frame pair of a clip: frames uint8 (T, 3, H, W), T >= 2."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 2 or frames.dtype != np.uint8:
        raise ValueError(f"estimate_ego_motion: frames must be uint8 (T >= 2, 3, H, W), got {frames.dtype} "
                         f"{frames.shape}")
    gray, intr = _prepare(frames, intrinsics)
    yaw, lateral, tracked, inliers = [], [], [], []
    for a, b in zip(gray[:-1], gray[1:]):
        p0, p1 = track(a, b, settings)
        psi, lam, frac = fit_planar_motion(p0, p1, intr, settings)
        yaw.append(psi)
        lateral.append(lam)
        tracked.append(len(p0))
        inliers.append(frac)
    return EgoMotion(np.array(yaw), np.array(lateral), np.array(tracked), np.array(inliers))
