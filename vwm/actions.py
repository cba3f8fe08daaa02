"""Action vocabulary shared by the data pipeline, the conditioner and the sampling CLI.

Order, widths and normalisations follow the reference (Vista) so that the 2432 input columns of the
action-control K/V projections keep their meaning: [command 1 | trajectory 8 | speed 4 | angle 4 | goal 2]
features, each embedded with 128 sinusoidal channels.
"""

from __future__ import annotations

ACTION_KEYS: tuple[str, ...] = ("command", "trajectory", "speed", "angle", "goal")
"""Batch keys of the five actions, in conditioner order (embedders 5-9)."""

ACTION_FEATURES: dict[str, int] = {"command": 1, "trajectory": 8, "speed": 4, "angle": 4, "goal": 2}
"""Number of scalar features per action."""

ACTION_EMBED_DIM = 128
"""Sinusoidal channels per action feature."""

ACTION_CONTEXT_DIM = ACTION_EMBED_DIM * sum(ACTION_FEATURES.values())  # 128 * 19 = 2432
"""Width of the action part of the cross-attention context."""

# Normalisations applied to the nuScenes annotation values (reference `NuScenesDataset`).
STEERING_WHEEL_RANGE_DEG = 780.0
"""`angle` features are steering-wheel degrees divided by this."""
GOAL_IMAGE_SIZE = (1600.0, 900.0)
"""`goal` features are (u, v) pixel coordinates in the original CAM_FRONT image divided by this."""

COMMANDS: dict[str, int] = {"right": 0, "left": 1, "stop": 2, "straight": 3}
"""High-level driving commands and their integer codes."""

MODALITIES: dict[str, tuple[str, ...]] = {
    "trajectory": ("trajectory",),
    "command": ("command",),
    "steer": ("speed", "angle"),
    "goal": ("goal",),
}
"""Action modalities as the reference shows them to the model one at a time (speed and angle together)."""
