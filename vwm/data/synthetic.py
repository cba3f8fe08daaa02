"""Random clips for benchmarks and smoke tests of the real training path: no files, every action present.

Use it as a subset of any training config, e.g. to time `train.py` on several GPUs without a dataset:

    data.params.subsets=[{target: vwm.data.synthetic.RandomClips, params: {length: 100000}}] data.params.probs=[1]

Clip `i` is the same for every process and epoch (drawn from numpy's generator seeded by (seed, i)).
"""

from __future__ import annotations

import numpy as np
import torch

from vwm.actions import ACTION_FEATURES, COMMANDS, STEERING_WHEEL_RANGE_DEG
from vwm.data.base import Clip
from vwm.data.video import check_target_size
from vwm.defaults import NUM_FRAMES


class RandomClips:
    """`length` clips of uniform random uint8 frames with plausible, normalised actions (as the nuScenes reader
    produces them: trajectory metres, speed m/s, steering / 780, goal / image size, a command code)."""

    def __init__(self, length: int = 10_000, *, num_frames: int = NUM_FRAMES, target_height: int = 320,
                 target_width: int = 576, seed: int = 0):
        check_target_size(target_height, target_width)
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"length={length!r} must be a positive integer")
        self.length, self.seed = length, int(seed)
        self.shape = (num_frames, 3, target_height, target_width)

    def __len__(self) -> int:
        return self.length

    def load_clip(self, index: int) -> Clip:
        """Clip `index`: frames uint8 (T, 3, H, W) and all five actions."""
        rng = np.random.default_rng([self.seed, index])
        frames = torch.from_numpy(rng.integers(0, 256, size=self.shape, dtype=np.uint8))
        speed = rng.uniform(0.0, 15.0, ACTION_FEATURES["speed"])
        forward = np.cumsum(np.repeat(speed[:1], 4) * 0.5)
        lateral = np.cumsum(rng.normal(0.0, 0.3, 4))
        actions = {
            "command": np.array([rng.integers(len(COMMANDS))]),
            "trajectory": np.stack([forward, lateral], axis=1).reshape(-1),
            "speed": speed,
            "angle": rng.uniform(-90.0, 90.0, ACTION_FEATURES["angle"]) / STEERING_WHEEL_RANGE_DEG,
            "goal": rng.uniform(0.0, 1.0, ACTION_FEATURES["goal"]),  # pixel / GOAL_IMAGE_SIZE, in [0, 1]
        }
        return Clip(frames=frames, actions={k: torch.as_tensor(v, dtype=torch.float32) for k, v in actions.items()},
                    source=f"random:{self.seed}:{index}")
