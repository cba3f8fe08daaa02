"""What a sampling run writes per sample: generated / ground-truth / comparison videos (+ gif, PNGs), the actions
shown, the rewards table, and the peak memory it records."""

from __future__ import annotations

import csv
import os
import resource

import numpy as np
import torch

from vwm.actions import ACTION_KEYS
from vwm.media import side_by_side, to_uint8_frames, write_gif, write_mp4, write_pngs
from vwm.sampling.options import SampleOptions

GT_PAD_VALUE = 127
"""Grey frames that pad the ground truth of the comparison video beyond the clip's frames."""


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, kind): CUDA's peak allocation on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss_process"


def write_outputs(folder: str, video: torch.Tensor, gt: torch.Tensor | None, opts: SampleOptions) -> dict:
    """Write the generated, ground-truth and comparison videos (+ gif, pngs) of one sample; return names."""
    os.makedirs(folder, exist_ok=True)
    generated = to_uint8_frames(video)
    files = {"generated": "generated.mp4"}
    write_mp4(generated, os.path.join(folder, files["generated"]), fps=opts.fps)
    if opts.gif:
        files["gif"] = "generated.gif"
        write_gif(generated, os.path.join(folder, files["gif"]), fps=opts.fps)
    if opts.png:
        files["pngs"] = "frames/"
        write_pngs(generated, os.path.join(folder, "frames"), prefix="generated")
    if gt is not None:
        real = to_uint8_frames(gt)
        files["ground_truth"] = "ground_truth.mp4"
        write_mp4(real, os.path.join(folder, files["ground_truth"]), fps=opts.fps)
        pad = np.full((max(0, len(generated) - len(real)), *real.shape[1:]), GT_PAD_VALUE, np.uint8)
        files["comparison"] = "comparison.mp4"
        comparison = side_by_side(np.concatenate([real, pad]), generated)
        write_mp4(comparison, os.path.join(folder, files["comparison"]), fps=opts.fps)
    return files


def shown_actions(actions: dict[str, torch.Tensor], i: int) -> dict[str, list[float]]:
    """The model features of the actions sample i of a batch shows the model."""
    mask = actions["action_mask"][i]
    return {k: actions[k][i].tolist() for j, k in enumerate(ACTION_KEYS) if bool(mask[j])}


def write_rewards(path: str, records: list[dict], opts: SampleOptions) -> None:
    """rewards.csv: one row per sample (name, dataset, index, reward, ensemble size, steps, action source)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "dataset", "index", "reward", "ens_size", "n_steps", "actions"])
        for r in records:
            writer.writerow([r["name"], r["dataset"], r["index"], repr(r["reward"]), opts.ens_size,
                             opts.n_steps, r["actions"]["from"]])
