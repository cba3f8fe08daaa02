"""vwm.data.synthetic.RandomClips: a file-free subset for benchmarks that the real DataModule accepts."""

from __future__ import annotations

import pytest
import torch

from vwm.actions import ACTION_FEATURES, ACTION_KEYS
from vwm.data.datamodule import VideoDataModule
from vwm.data.synthetic import RandomClips


def test_clips_are_deterministic_per_index_and_carry_every_action():
    src = RandomClips(8, num_frames=5, target_height=64, target_width=64, seed=3)
    a, b, c = src.load_clip(2), src.load_clip(2), src.load_clip(3)
    assert a.frames.dtype == torch.uint8 and a.frames.shape == (5, 3, 64, 64)
    assert torch.equal(a.frames, b.frames) and not torch.equal(a.frames, c.frames)
    assert set(a.actions) == set(ACTION_KEYS)
    for key in ACTION_KEYS:
        assert a.actions[key].shape == (ACTION_FEATURES[key],) and a.actions[key].dtype == torch.float32
    assert 0 <= a.actions["command"].item() <= 3 and abs(a.actions["angle"]).max() < 0.2


def test_datamodule_builds_batches_from_random_clips():
    dm = VideoDataModule(batch_size=2, num_workers=0, pin_memory=False, persistent_workers=False, num_frames=5,
                         target_height=64, target_width=64, seed=0,
                         subsets=[{"target": "vwm.data.synthetic.RandomClips", "params": {"length": 16}}])
    dm.setup(rank=0, world_size=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["img_seq"].shape[:2] == (2, 5) and "trajectory" in batch


def test_invalid_length_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match="length=0"):
        RandomClips(0, num_frames=5, target_height=64, target_width=64)
