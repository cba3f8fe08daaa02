"""Defaults that several parts of vwm share, stated once: the clip length of SVD-XT, the training resolution of
the DataModule, the run seed and the sampler's step count (the reference's values)."""

from __future__ import annotations

NUM_FRAMES = 25
"""Frames per clip (SVD-XT); `DiffusionEngine(num_frames=...)` and every subset default to it."""
TRAIN_HEIGHT, TRAIN_WIDTH = 320, 576
"""Training resolution the DataModule defaults to (phase 2 stage 1)."""
SEED = 23
"""Run seed of `train.py`, `sample.py` and the evaluation protocol (the reference's `--seed` default)."""
SAMPLING_STEPS = 50
"""Sampler steps per round of `sample.py`, the rollout and the evaluation protocol."""
