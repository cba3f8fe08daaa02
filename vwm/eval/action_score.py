"""Action following: does the motion seen in a (generated) clip follow the commanded trajectory?

No learned weights. The camera's heading over the clip is estimated from the frames (vwm.eval.egomotion:
tracked points, planar-motion essential matrix with the clip's intrinsics, integrated yaw) and compared with
the heading the commanded trajectory implies. Heading is what a single camera observes without scale; speed
and distance travelled are not scored.

Commanded heading. The trajectory gives the ego position (x forward, y left, metres, frame-0 ego frame) at the
clip's key frames (vwm.actions.key_frame_indices: 0, 6, 12, 18, 24 of 25 frames), frame 0 at the origin. The
direction of the chord between key frames k-1 and k is the heading at the chord's middle for any path of
constant curvature (a circular arc turns symmetrically about its chord), and a second-order approximation of
it otherwise. So the commanded heading at the middle frame m_k = (key_{k-1} + key_k) / 2 is h_k = atan2(y_k -
y_{k-1}, x_k - x_{k-1}), defined when the chord is at least `min_chord_m` long (the car moves), and the
estimate compared with it is the integrated yaw interpolated at frame m_k.

Per clip: the heading error (mean |est - cmd| over the defined chords) and the final headings (last defined
chord). Over clips (`agreement`): the mean heading error, the rank correlation (Spearman) and the linear
correlation of estimated against commanded final headings, the least-squares slope through the origin
(1 = the magnitude of turns is followed), and the accuracy of the turn direction (left / straight / right at
+-`turn_deg`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from vwm.actions import key_frame_indices
from vwm.eval.egomotion import EgoMotion, Intrinsics, MotionSettings, estimate_ego_motion

MIN_CHORD_M = 0.5
"""Shorter chords (the car nearly stands) have no defined heading."""
TURN_DEG = 5.0
"""Final heading beyond which a clip counts as a turn (left / right), else straight."""


def commanded_headings(trajectory: np.ndarray | list[float], num_frames: int,
                       min_chord_m: float = MIN_CHORD_M) -> tuple[np.ndarray, np.ndarray]:
    """(mid frames (4,), commanded headings in degrees (4,), NaN where undefined) of a trajectory of 4 future
    key-frame positions (8 numbers or (4, 2), metres, ego frame of frame 0: x forward, y left)."""
    points = np.asarray(trajectory, dtype=np.float64).reshape(-1, 2)
    keys = key_frame_indices(num_frames)
    if len(points) != len(keys) - 1:
        raise ValueError(f"trajectory holds {len(points)} points; expected {len(keys) - 1} (key frames {keys[1:]})")
    path = np.concatenate([np.zeros((1, 2)), points])
    chords = np.diff(path, axis=0)
    length = np.linalg.norm(chords, axis=1)
    headings = np.degrees(np.arctan2(chords[:, 1], chords[:, 0]))
    headings[length < min_chord_m] = np.nan
    mids = np.array([(a + b) / 2 for a, b in zip(keys[:-1], keys[1:])], dtype=np.float64)
    return mids, headings


def _fill_gaps(yaw: np.ndarray) -> tuple[np.ndarray, int]:
    """Failed pair estimates (NaN) replaced by linear interpolation of their neighbours; the count filled."""
    bad = ~np.isfinite(yaw)
    if not bad.any() or bad.all():
        return yaw, int(bad.sum())
    idx = np.arange(len(yaw))
    out = yaw.copy()
    out[bad] = np.interp(idx[bad], idx[~bad], yaw[~bad])
    return out, int(bad.sum())


@dataclass
class ClipScore:
    """Action following of one clip (degrees; None where undefined)."""

    heading_cmd_deg: list[float | None]
    heading_est_deg: list[float | None]
    heading_error_deg: float | None
    final_cmd_deg: float | None
    final_est_deg: float | None
    turn_cmd: str | None
    turn_est: str | None
    failed_pairs: int
    yaw_per_frame_deg: list[float]

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def turn_label(heading_deg: float | None, turn_deg: float = TURN_DEG) -> str | None:
    """left / straight / right of a final heading (+ = left)."""
    if heading_deg is None or not math.isfinite(heading_deg):
        return None
    return "left" if heading_deg > turn_deg else "right" if heading_deg < -turn_deg else "straight"


def _maybe(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def score_motion(motion: EgoMotion, trajectory: np.ndarray | list[float], num_frames: int,
                 turn_deg: float = TURN_DEG) -> ClipScore:
    """Compare an estimated ego-motion of a `num_frames` clip with its commanded trajectory."""
    yaw, failed = _fill_gaps(np.asarray(motion.yaw_deg, dtype=np.float64))
    heading = np.concatenate([[0.0], np.cumsum(yaw)])
    if len(heading) != num_frames:
        raise ValueError(f"ego-motion of {len(heading)} frames for a clip of num_frames={num_frames}")
    mids, cmd = commanded_headings(trajectory, num_frames)
    est = np.interp(mids, np.arange(num_frames), heading)
    defined = np.isfinite(cmd) & np.isfinite(est)
    error = float(np.abs(est[defined] - cmd[defined]).mean()) if defined.any() else float("nan")
    last = int(np.flatnonzero(defined)[-1]) if defined.any() else None
    final_cmd = float(cmd[last]) if last is not None else float("nan")
    final_est = float(est[last]) if last is not None else float("nan")
    return ClipScore(
        heading_cmd_deg=[_maybe(v) for v in cmd], heading_est_deg=[_maybe(v) for v in est],
        heading_error_deg=_maybe(error), final_cmd_deg=_maybe(final_cmd), final_est_deg=_maybe(final_est),
        turn_cmd=turn_label(_maybe(final_cmd), turn_deg), turn_est=turn_label(_maybe(final_est), turn_deg),
        failed_pairs=failed, yaw_per_frame_deg=[_maybe(v) for v in motion.yaw_deg],
    )


def score_clip(frames: np.ndarray, trajectory: np.ndarray | list[float], intrinsics: Intrinsics,
               settings: MotionSettings = MotionSettings(), turn_deg: float = TURN_DEG) -> ClipScore:
    """Action following of one clip: uint8 frames (T, 3, H, W) against its commanded trajectory."""
    frames = np.asarray(frames)
    return score_motion(estimate_ego_motion(frames, intrinsics, settings), trajectory, frames.shape[0], turn_deg)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    values, inverse = np.unique(x, return_inverse=True)
    if len(values) < len(x):
        sums = np.bincount(inverse, weights=ranks)
        counts = np.bincount(inverse)
        ranks = (sums / counts)[inverse]
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else None


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (None for fewer than 3 pairs or a constant series)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3:
        return None
    return _pearson(_ranks(a), _ranks(b))


def agreement(scores: list[ClipScore] | list[dict]) -> dict:
    """Agreement of estimated and commanded headings over clips (see the module doc)."""
    rows = [s.to_json() if isinstance(s, ClipScore) else s for s in scores]
    errors = np.array([r["heading_error_deg"] for r in rows if r["heading_error_deg"] is not None])
    pairs = np.array([(r["final_cmd_deg"], r["final_est_deg"]) for r in rows
                      if r["final_cmd_deg"] is not None and r["final_est_deg"] is not None]).reshape(-1, 2)
    labels = [(r["turn_cmd"], r["turn_est"]) for r in rows if r["turn_cmd"] is not None and r["turn_est"]]
    cmd, est = pairs[:, 0], pairs[:, 1]
    slope = float((cmd * est).sum() / (cmd * cmd).sum()) if len(cmd) and (cmd * cmd).sum() > 0 else None
    return {
        "clips": len(rows),
        "clips_with_heading": int(len(pairs)),
        "heading_error_deg": float(errors.mean()) if len(errors) else None,
        "heading_error_deg_median": float(np.median(errors)) if len(errors) else None,
        "final_heading_spearman": spearman(cmd, est),
        "final_heading_pearson": _pearson(cmd, est) if len(cmd) >= 3 else None,
        "final_heading_slope": slope,
        "turn_direction_accuracy": (sum(a == b for a, b in labels) / len(labels)) if labels else None,
        "turn_deg": TURN_DEG,
        "failed_pairs": int(sum(r["failed_pairs"] for r in rows)),
    }
