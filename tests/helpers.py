"""Builders shared by the tests: the tiny model and synthetic batches in the batch contract."""

from __future__ import annotations

import functools
import os

import torch

from vwm.actions import ACTION_FEATURES, ACTION_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
REFERENCE_CONFIGS = os.path.join(DATA, "reference_configs")
TINY_MODEL = os.path.join(REPO, "configs", "tiny", "model.yaml")


@functools.lru_cache(maxsize=None)
def tiny_config(*overrides: str):
    """The tiny model config (cached; treat as read-only)."""
    from vwm.config import load_config

    return load_config(TINY_MODEL, list(overrides))


def build_tiny(*overrides: str, seed: int = 0, nonzero: bool = True):
    """A tiny DiffusionEngine; `nonzero` re-initialises zero-initialised weights so every path is exercised."""
    from vwm.config import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_config(*overrides))
    if nonzero:
        with torch.no_grad():
            for name, p in model.model.named_parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0.0, 0.02)
        if model.use_ema:
            model.model_ema.reset(model.model)
    return model


def make_batch(b: int = 2, t: int = 5, h: int = 64, w: int = 64, seed: int = 0, actions: bool = True):
    """A synthetic batch following the batch contract (docs/architecture.md)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, t, 3, h, w, generator=g) * 2 - 1
    batch = {
        "img_seq": img,
        "cond_frames_without_noise": img[:, 0].clone(),
        "cond_frames": img[:, 0].clone(),
        "cond_aug": torch.zeros(b),
        "fps_id": torch.full((b,), 9.0),
        "motion_bucket_id": torch.full((b,), 127.0),
    }
    if actions:
        for key in ACTION_KEYS:
            batch[key] = torch.randn(b, ACTION_FEATURES[key], generator=g)
        batch["action_mask"] = torch.ones(b, len(ACTION_KEYS), dtype=torch.bool)
    return batch
