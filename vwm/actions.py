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


def context_width(context_dim: int, action_control: bool) -> int:
    """Cross-attention context width a network expects: the CLIP width, plus the action columns when enabled."""
    return int(context_dim) + (ACTION_CONTEXT_DIM if action_control else 0)


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

# Command thresholds (metres) on the ego displacement over the clip, in the ego frame of the first frame
# (x forward, y left). The reference's exact thresholds are unpublished; these follow the common
# nuScenes planning convention (|lateral| >= 2 m is a turn) plus a stop rule. See docs/data.md.
STOP_DISTANCE_M = 1.0
"""Total displacement below which the command is `stop`."""
TURN_LATERAL_M = 2.0
"""Lateral offset of the final position beyond which the command is a turn."""


def command_from_endpoint(x: float, y: float) -> int:
    """High-level command from the final ego position (x forward, y left, metres, first-frame ego frame)."""
    if (x * x + y * y) ** 0.5 < STOP_DISTANCE_M:
        return COMMANDS["stop"]
    if y >= TURN_LATERAL_M:
        return COMMANDS["left"]
    if y <= -TURN_LATERAL_M:
        return COMMANDS["right"]
    return COMMANDS["straight"]


def key_frame_indices(num_frames: int, num_keys: int = 5) -> list[int]:
    """Frames that carry action annotations: 5 evenly spaced key frames (0, 6, 12, 18, 24 for 25 frames,
    nuScenes' 2 Hz key frames inside a 12 Hz clip)."""
    if num_frames < num_keys:
        raise ValueError(f"num_frames={num_frames} must be >= {num_keys} to place {num_keys} action key frames")
    return [round(i * (num_frames - 1) / (num_keys - 1)) for i in range(num_keys)]
