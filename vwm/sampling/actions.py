"""Actions given to a sampling run in the reference's annotation units (vista.md §1.10): per-round JSON plans
(`sample.py --actions_json`) and the ground-truth actions of a modality, as model features."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from vwm.actions import ACTION_FEATURES, ACTION_KEYS, COMMANDS, GOAL_IMAGE_SIZE, MODALITIES, STEERING_WHEEL_RANGE_DEG


def normalise_actions(raw: Mapping[str, Any], where: str = "actions") -> dict[str, torch.Tensor]:
    """Model features from actions in the reference's annotation units (vista.md §1.10).

    trajectory: 8 numbers or 4 [x, y] pairs, metres, ego frame of frame 0 (x forward, y left);
    command: 0-3 or right / left / stop / straight; speed: 4 numbers in the annotation's speed unit;
    angle: 4 steering-wheel angles in degrees (|a| <= 780, divided by 780); goal: [u, v] pixel in the
    1600x900 CAM_FRONT image (0 < u < 1600, 0 < v < 900, divided by the image size).
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be an object with keys among {list(ACTION_KEYS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(ACTION_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown action key(s) {unknown}; allowed: {list(ACTION_KEYS)}")
    out = {}
    for key, value in raw.items():
        if key == "command":
            value = COMMANDS.get(value, value) if isinstance(value, str) else value
            if isinstance(value, bool) or not isinstance(value, int) or value not in COMMANDS.values():
                raise ValueError(f"{where}.command={value!r} is invalid; allowed: "
                                 f"{sorted(COMMANDS.values())} or {list(COMMANDS)}")
            out[key] = torch.tensor([float(value)])
            continue
        if key == "trajectory" and isinstance(value, list) and all(isinstance(p, list) for p in value):
            value = [c for point in value for c in point]
        n = ACTION_FEATURES[key]
        if (not isinstance(value, list) or len(value) != n
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in value)):
            raise ValueError(f"{where}.{key}={value!r} is invalid; allowed: {n} finite numbers"
                             + (" (or 4 [x, y] pairs)" if key == "trajectory" else ""))
        features = torch.tensor(value, dtype=torch.float64)
        if key == "angle":
            if features.abs().max() > STEERING_WHEEL_RANGE_DEG:
                raise ValueError(f"{where}.angle={value!r} is invalid; allowed: steering-wheel degrees in "
                                 f"[-{STEERING_WHEEL_RANGE_DEG:g}, {STEERING_WHEEL_RANGE_DEG:g}]")
            features = features / STEERING_WHEEL_RANGE_DEG
        elif key == "goal":
            size = torch.tensor(GOAL_IMAGE_SIZE, dtype=torch.float64)
            if not bool(((features > 0) & (features < size)).all()):
                raise ValueError(f"{where}.goal={value!r} is invalid; allowed: [u, v] with 0 < u < "
                                 f"{GOAL_IMAGE_SIZE[0]:g} and 0 < v < {GOAL_IMAGE_SIZE[1]:g} (pixels)")
            features = features / size
        out[key] = features.float()
    return out


def load_action_plan(path: str, n_rounds: int) -> list[dict[str, torch.Tensor]]:
    """Per-round model features from a JSON file: one object for every round, or a list of n_rounds."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"actions_json={path!r} is not valid JSON: {err}") from err
    if isinstance(data, dict):
        data = [data] * n_rounds
    if not isinstance(data, list) or len(data) != n_rounds:
        got = f"a list of {len(data)}" if isinstance(data, list) else type(data).__name__
        raise ValueError(f"actions_json={path!r} holds {got}; allowed: one object (used for every round) or "
                         f"a list of n_rounds={n_rounds} objects")
    return [normalise_actions(entry, f"actions_json round {r + 1}") for r, entry in enumerate(data)]


def select_modality(actions: Mapping[str, torch.Tensor], modality: str | None) -> tuple[dict, list[str]]:
    """(the actions of a modality of vwm.actions.MODALITIES, or none for None; the keys it lacks)."""
    keys = () if modality is None else MODALITIES[modality]
    return {k: actions[k] for k in keys if k in actions}, [k for k in keys if k not in actions]
