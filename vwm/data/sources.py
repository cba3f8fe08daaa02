"""Weighted multi-source clip sampling: subsets built from config (reference names or `{target, params}` nodes),
and the map-style dataset that draws a subset and a clip for each (epoch, stream position) from a counter-seeded
generator, skips broken clips under a failure budget and applies the action-visibility policy. Deterministic in
(seed, epoch, position): the DataModule (`vwm.data.datamodule`) streams the keys and collates the clips."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vwm.actions import ACTION_FEATURES, ACTION_KEYS, MODALITIES
from vwm.config import REFERENCE_SUBSETS, locate, to_container
from vwm.data.base import BrokenSampleError, Clip

log = logging.getLogger(__name__)

Visibility = Literal["rotate", "all"]
DERIVED_PARAMS = ("num_frames", "target_height", "target_width")
"""Subset constructor arguments the DataModule supplies itself."""
FRACTION_WARMUP = 100
"""Draws a worker makes before `max_failure_fraction` is enforced."""


class DataBudgetError(RuntimeError):
    """Too many broken samples: the data (root, annotations, files) needs fixing before training goes on."""


class ClipSource(Protocol):
    """What the DataModule needs from a subset (docs/architecture.md, "Data subsets"). Optional: a true
    `yields_moments` attribute (clips carry cached VAE moments) and `check_model(model)`, called at setup with
    the model being trained (a latent cache compares its VAE identity there)."""

    def __len__(self) -> int: ...

    def load_clip(self, index: int) -> Clip:
        """Decode clip `index`; raise BrokenSampleError for unreadable media."""
        ...


def build_subset(spec: str | Mapping[str, Any] | ClipSource, *, num_frames: int, target_height: int,
                 target_width: int) -> ClipSource:
    """Construct one subset from a reference name, a `{target, params}` mapping or an already built object."""
    derived = {"num_frames": num_frames, "target_height": target_height, "target_width": target_width}
    spec = to_container(spec)
    if isinstance(spec, str):
        if spec not in REFERENCE_SUBSETS:
            raise ValueError(f"subsets item {spec!r} is not one of {sorted(REFERENCE_SUBSETS)}; "
                             "give a {target, params} mapping for any other data")
        target, params = REFERENCE_SUBSETS[spec][0], dict(REFERENCE_SUBSETS[spec][1])
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"target", "params"})
        if unknown or not isinstance(spec.get("target"), str):
            raise ValueError(f"subsets item {spec!r} must be {{target: <dotted class>, params: {{...}}}}; "
                             f"unexpected keys {unknown}")
        target, params = spec["target"], dict(spec.get("params") or {})
    elif callable(getattr(spec, "load_clip", None)) and hasattr(spec, "__len__"):
        for name, value in derived.items():
            if getattr(spec, name, value) != value:
                raise ValueError(f"prebuilt subset {type(spec).__name__} has {name}={getattr(spec, name)!r}, "
                                 f"the DataModule has {name}={value!r}")
        return spec
    else:
        raise ValueError(f"subsets item {spec!r} must be a name in {sorted(REFERENCE_SUBSETS)}, a "
                         "{target, params} mapping or an object with load_clip()")
    cls = locate(target, "subsets target")
    clashing = sorted(set(params) & set(derived))
    if clashing:
        raise ValueError(f"subsets params {clashing} of {target} are derived by the DataModule; set them on "
                         "the DataModule (num_frames, target_height, target_width)")
    allowed = [n for n in inspect.signature(cls).parameters if n not in derived]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"subsets params {unknown} are not accepted by {target}; allowed: {allowed}")
    return cls(**params, **derived)


class MultiSourceClips(Dataset):
    """Map-style dataset over (epoch, stream position) keys: each key draws a subset and a clip from a
    counter-seeded generator, skips broken clips with deterministic replacements and applies the action
    visibility policy. Returns uint8 frames; `ClipCollator` builds the batch."""

    def __init__(self, subsets: Sequence[ClipSource], probs: Sequence[float], samples_per_epoch: int, *,
                 seed: int, shuffle: bool, visibility: Visibility, max_consecutive_failures: int,
                 max_failure_fraction: float, names: Sequence[str], frame_shape: tuple[int, int, int, int]):
        self.subsets = list(subsets)
        self.frame_shape = tuple(frame_shape)
        self.names = list(names)
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.shuffle = shuffle
        self.visibility = visibility
        self.max_consecutive_failures = max_consecutive_failures
        self.max_failure_fraction = max_failure_fraction
        self._cum = np.cumsum(np.asarray(probs, dtype=np.float64))
        self._cum[-1] = 1.0
        self._offsets = np.cumsum([0] + [len(s) for s in self.subsets])
        self.attempts = 0
        self.failures = 0
        self._logged: set[str] = set()
        self._examples: list[str] = []

    def __len__(self) -> int:
        return self.samples_per_epoch

    def draw(self, epoch: int, position: int, attempt: int) -> tuple[int, int, float]:
        """(subset, index in subset, visibility variate) of a stream position; attempts > 0 replace it."""
        rng = np.random.default_rng([self.seed, epoch, position, attempt])
        u_subset, u_visibility = rng.random(2)
        if attempt == 0 and not self.shuffle:
            flat = position % int(self._offsets[-1])
            subset = int(np.searchsorted(self._offsets, flat, side="right")) - 1
            return subset, flat - int(self._offsets[subset]), float(u_visibility)
        subset = min(int(np.searchsorted(self._cum, u_subset, side="right")), len(self.subsets) - 1)
        return subset, int(rng.integers(len(self.subsets[subset]))), float(u_visibility)

    def visible_actions(self, available: Sequence[str], u: float) -> list[str]:
        """Actions shown to the model: all available ones, or one available modality chosen by `u`."""
        if self.visibility == "all":
            return [k for k in ACTION_KEYS if k in available]
        modalities = [m for m, keys in MODALITIES.items() if any(k in available for k in keys)]
        if not modalities:
            return []
        chosen = MODALITIES[modalities[min(int(u * len(modalities)), len(modalities) - 1)]]
        return [k for k in chosen if k in available]

    def _record_failure(self, exc: BrokenSampleError, subset: int, index: int) -> None:
        self.failures += 1
        if exc.path not in self._logged:
            self._logged.add(exc.path)
            log.warning("skipping broken sample %s (subset %s, index %d): %s", exc.path, self.names[subset],
                        index, exc.reason)
            if len(self._examples) < 5:
                self._examples.append(f"{exc.path} ({exc.reason})")
        if self.attempts >= FRACTION_WARMUP and self.failures > self.max_failure_fraction * self.attempts:
            raise DataBudgetError(
                f"{self._rate()} exceeds max_failure_fraction={self.max_failure_fraction}; examples: "
                f"{'; '.join(self._examples)}")

    def _rate(self) -> str:
        return (f"broken-sample rate {self.failures}/{self.attempts} = "
                f"{100.0 * self.failures / max(self.attempts, 1):.1f}% in this worker")

    def _check_clip(self, clip: Clip, subset: int, index: int) -> None:
        shape = self.frame_shape if clip.moments is None else (1, *self.frame_shape[1:])
        if tuple(clip.frames.shape) != shape or clip.frames.dtype != torch.uint8:
            raise ValueError(f"subset {self.names[subset]} returned frames {tuple(clip.frames.shape)} "
                             f"{clip.frames.dtype} for index {index}; expected uint8 {shape}")
        moments = clip.moments
        if moments is not None and (moments.ndim != 4 or moments.shape[0] != self.frame_shape[0]):
            raise ValueError(f"subset {self.names[subset]} returned moments {tuple(moments.shape)} for "
                             f"index {index}; expected ({self.frame_shape[0]}, 2C, h, w)")
        for key, value in clip.actions.items():
            if key not in ACTION_FEATURES or tuple(value.shape) != (ACTION_FEATURES[key],):
                raise ValueError(f"subset {self.names[subset]} returned action {key!r} of shape "
                                 f"{tuple(value.shape)} for index {index}; expected one of {ACTION_FEATURES}")

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, position = (0, key) if isinstance(key, int) else key
        for attempt in range(self.max_consecutive_failures):
            subset, index, u = self.draw(epoch, position, attempt)
            self.attempts += 1
            try:
                clip = self.subsets[subset].load_clip(index)
            except BrokenSampleError as exc:
                self._record_failure(exc, subset, index)
                continue
            self._check_clip(clip, subset, index)
            visible = self.visible_actions(list(clip.actions), u)
            item = {"frames": clip.frames, "actions": {k: clip.actions[k] for k in visible},
                    "n_skipped": attempt, "sample_id": (epoch, position, subset, index)}
            if clip.moments is not None:
                item["moments"] = clip.moments
            return item
        raise DataBudgetError(
            f"{self.max_consecutive_failures} consecutive broken samples while drawing epoch {epoch} "
            f"position {position} (max_consecutive_failures); {self._rate()}; examples: "
            f"{'; '.join(self._examples)}. Check data_root / anno_file of the subsets")
