"""Evaluation protocols: what is generated and how it is measured, as named presets (docs/evaluation.md).

`vista` is the protocol of the Vista paper's Table 2 as far as its authors described it (OpenDriveLab/Vista
issues #9, #37, #60): all clips of the published nuScenes val annotation (5369), 576x1024, action-free, one
condition frame, the reference sampler's defaults (50 Euler steps, CFG 2.5); FID with torchmetrics'
Inception pipeline on the 24 predicted frames of every clip (the condition frame excluded); FVD with LVDM's
I3D pipeline on the 25-frame clips (16-frame FVD reported next to it, as the reproduction in #60 did). The
paper does not say which frames its FVD saw or how many sampling steps it used; these choices are vwm's,
written into every summary so two numbers can be compared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from vwm.defaults import SAMPLING_STEPS, SEED
from vwm.eval.i3d import MIN_FRAMES

Dataset = Literal["NUSCENES", "TOY"]
Metric = Literal["fid", "fvd", "action"]
METRICS: tuple[str, ...] = ("fid", "fvd", "action")
VISTA_VAL_CLIPS = 5369
"""Clips of the published `nuScenes_val.json` (reference/vista.md §1.10)."""


@dataclass(frozen=True)
class Protocol:
    """Everything that decides an evaluation's numbers except the model and the data files."""

    name: str
    dataset: Dataset = "NUSCENES"
    height: int = 576
    width: int = 1024
    action: str = "free"
    """sample.py --action modality shown to the model: free (none), traj, cmd, steer, goal."""
    n_conds: int = 1
    n_steps: int = SAMPLING_STEPS
    cfg_scale: float = 2.5
    guider: str | None = None
    sampler: str = "euler"
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    seed: int = SEED
    fid_skip_frames: int = 1
    """Leading frames left out of FID (the condition frames: they are the input, not a prediction)."""
    fid_normalize: str = "torchmetrics"
    """vwm.eval.inception.preprocess convention."""
    fvd_frames: tuple[int, ...] = (25, 16)
    """Clip lengths of the FVDs, each over the first n frames of the clip (condition frame included)."""
    metrics: tuple[str, ...] = METRICS
    expected_clips: int | None = VISTA_VAL_CLIPS
    """Clips of the full evaluation set (for the projected wall time); None: whatever the data holds."""

    def validate(self, num_frames: int) -> None:
        """Raise ValueError naming the field, its value and what is allowed, for a model of num_frames."""
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"metrics={list(self.metrics)} is invalid; allowed: a non-empty subset of "
                             f"{list(METRICS)}")
        if "fvd" in self.metrics:
            wrong = [n for n in self.fvd_frames if not MIN_FRAMES <= n <= num_frames]
            if wrong or not self.fvd_frames:
                raise ValueError(f"fvd_frames={list(self.fvd_frames)} is invalid; allowed: clip lengths between "
                                 f"{MIN_FRAMES} (I3D's minimum) and the model's num_frames={num_frames}")
        if not 0 <= self.fid_skip_frames < num_frames:
            raise ValueError(f"fid_skip_frames={self.fid_skip_frames} is invalid; allowed: 0 to {num_frames - 1}")
        if self.fid_normalize not in ("torchmetrics", "pytorch_fid"):
            raise ValueError(f"fid_normalize={self.fid_normalize!r} is invalid; allowed: torchmetrics, "
                             "pytorch_fid")

    def replace(self, **changes: object) -> Protocol:
        """A copy with fields changed (None values are ignored: an unset CLI flag keeps the preset's value)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def differences(self, other: Protocol) -> dict[str, list]:
        """Fields that differ from another protocol: {field: [ours, theirs]}."""
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return {k: [a[k], b[k]] for k in a if k not in ("name", "metrics", "expected_clips") and a[k] != b[k]}


PRESETS: dict[str, Protocol] = {
    "vista": Protocol(name="vista"),
    "toy": Protocol(name="toy", dataset="TOY", height=64, width=64, action="steer", n_steps=12, cfg_scale=3.0,
                    sigma_min=4.0, sigma_max=80.0, fvd_frames=(), metrics=("fid", "action"), expected_clips=None),
}
"""`vista`: the paper's nuScenes protocol. `toy`: the demo model on toy-world clips (scripts/demo.py settings;
8-frame clips are too short for I3D, so no FVD)."""
