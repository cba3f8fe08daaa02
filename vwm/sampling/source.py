"""The clips a sampling run starts from (`--dataset` NUSCENES, TOY or IMG) and the actions of each round."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vwm.data.batch import action_batch
from vwm.data.nuscenes import NuScenesSubset
from vwm.data.toyworld import ToyWorldSubset
from vwm.data.video import IMAGE_EXTENSIONS, decode_image, to_unit_range
from vwm.sampling.actions import select_modality
from vwm.sampling.options import ACTION_MODES, TOY_CLIPS, SampleOptions


@dataclass
class Item:
    """One start of a rollout: condition frames, ground truth (if any), available actions, origin."""

    frames: torch.Tensor
    gt: torch.Tensor | None
    actions: dict[str, torch.Tensor]
    source: str


class Source:
    """The --dataset as a list of Items at the target size."""

    def __init__(self, opts: SampleOptions, num_frames: int):
        self.kind = opts.dataset
        self.size = (opts.height, opts.width)
        if opts.dataset == "NUSCENES":
            self.subset = NuScenesSubset(opts.data_root, opts.anno_file, num_frames=num_frames,
                                         target_height=opts.height, target_width=opts.width, turn_repeat=1,
                                         complete_repeat=1, jpeg_draft=False)
        elif opts.dataset == "TOY":
            self.subset = ToyWorldSubset(num_frames, opts.height, opts.width, length=TOY_CLIPS,
                                         seed=opts.toy_seed)
        else:
            names = sorted(n for n in os.listdir(opts.image_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                raise ValueError(f"--image_dir={opts.image_dir!r} holds no image; allowed extensions: "
                                 f"{', '.join(IMAGE_EXTENSIONS)}")
            self.images = [os.path.join(opts.image_dir, n) for n in names]

    def __len__(self) -> int:
        return len(self.images) if self.kind == "IMG" else len(self.subset)

    def load(self, index: int) -> Item:
        """Item `index` (frames uint8 (T or 1, 3, H, W))."""
        if self.kind != "IMG":
            clip = self.subset.load_clip(index)
            return Item(clip.frames, clip.frames, dict(clip.actions), clip.source)
        image = decode_image(self.images[index], *self.size, draft=False)
        return Item(torch.tensor(image).permute(2, 0, 1)[None].contiguous(), None, {}, self.images[index])


def select_indices(opts: SampleOptions, length: int) -> list[int]:
    """Dataset indices to sample: --index, else the first --n_samples of 0..N-1 or of a seeded permutation."""
    if opts.index is not None:
        bad = [i for i in opts.index if not 0 <= i < length]
        if bad:
            raise ValueError(f"--index {bad} out of range; allowed: 0 to {length - 1} ({opts.dataset} has "
                             f"{length} items)")
        return list(opts.index)
    n = length if opts.n_samples is None else opts.n_samples
    if n > length:
        raise ValueError(f"--n_samples={n} is invalid; allowed: <= {length} ({opts.dataset} has {length} "
                         "items)")
    order = np.random.default_rng(opts.seed).permutation(length) if opts.random_order else np.arange(length)
    return [int(i) for i in order[:n]]


def round_actions(opts: SampleOptions, items: Sequence[Item], plan: list[dict] | None
                  ) -> tuple[list[dict], list[list[str]]]:
    """Per-round action batches (the --actions_json plan, else each clip's ground truth of the --action
    modality, the same every round) and, per item, the actions its modality lacks."""
    if plan is not None:
        return [action_batch([r] * len(items)) for r in plan], [[] for _ in items]
    chosen = [select_modality(item.actions, ACTION_MODES[opts.action or "free"]) for item in items]
    return [action_batch([a for a, _ in chosen])] * opts.n_rounds, [m for _, m in chosen]


def condition_frames(items: Sequence[Item], n: int) -> torch.Tensor:
    """(B, n, 3, H, W) in [-1, 1]: each item's first n frames (a single start image repeated)."""
    frames = [it.frames.repeat(n, 1, 1, 1) if len(it.frames) == 1 else it.frames[:n] for it in items]
    return torch.stack([to_unit_range(f) for f in frames])
