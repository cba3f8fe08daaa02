"""One sampling run: check the options, load the model, then per batch of clips sample the rollout (or the reward
ensemble) with `vwm.rollout`, decode it and write its outputs and records.

    sample.py (vwm/cli/sample.py: parse) -> run() here -> vwm.rollout.sample_latents / decode_rollout
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import torch
from tqdm import tqdm

from vwm.models.engine import DiffusionEngine, step_seed
from vwm.rollout import (
    Placement,
    decode_rollout,
    ensemble_reward,
    output_frames,
    sample_generator,
    sample_latents,
)
from vwm.sampling.actions import load_action_plan
from vwm.sampling.model import configured_frames, describe_model, load_model, model_config
from vwm.sampling.options import SampleOptions, check_options, resolve_device, rollout_settings
from vwm.sampling.outputs import peak_memory, shown_actions, write_outputs, write_rewards
from vwm.sampling.source import Item, Source, condition_frames, round_actions, select_indices

log = logging.getLogger(__name__)


def apply_cudnn_benchmark(opts: SampleOptions, device: torch.device) -> bool:
    """--cudnn_benchmark on CUDA: cuDNN times its convolution algorithms for each new shape (a rollout's shapes are
    fixed, so once) and keeps the fastest. Returns whether it is on; a CPU run leaves the flag alone."""
    if opts.cudnn_benchmark and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return bool(torch.backends.cudnn.benchmark)


def sample_batch(model: DiffusionEngine, placement: Placement, opts: SampleOptions, batch: list[int], items: list[Item],
                  actions: list[dict]) -> tuple[torch.Tensor, list[float] | None, dict[str, float]]:
    """(video (B, L, 3, H, W) in [-1, 1], rewards or None, seconds per stage) of one batch of clips."""
    settings = rollout_settings(opts)
    frames = condition_frames(items, max(opts.n_conds, 1))
    generators = [sample_generator(opts.seed, i) for i in batch]
    ensemble = opts.ens_size if opts.reward else 1
    timings: dict[str, float] = {}
    with tqdm(total=opts.n_steps * opts.n_rounds * ensemble, desc="denoising", unit="step", leave=False,
              file=sys.stderr) as bar:
        latents = sample_latents(model, frames, actions, generators, settings, placement, ensemble,
                                 lambda _: bar.update(1), timings)
    video = decode_rollout(model, latents[0], settings, placement, timings)
    return video, (ensemble_reward(latents).tolist() if opts.reward else None), timings


def run(opts: SampleOptions) -> dict:
    """Sample every selected clip, write its outputs under opts.save and return the run summary."""
    check_options(opts)
    device = resolve_device(opts.device)
    cfg, cfg_source = model_config(opts)
    num_frames = configured_frames(cfg)
    if opts.n_frames is not None and opts.n_frames != num_frames:
        raise ValueError(f"--n_frames={opts.n_frames} is invalid; allowed: {num_frames}, the frame count the "
                         "model was trained with (longer videos: --n_rounds)")
    rollout_settings(opts).validate(num_frames)
    plan_actions = None if opts.actions_json is None else load_action_plan(opts.actions_json, opts.n_rounds)
    source = Source(opts, num_frames)
    indices = select_indices(opts, len(source))
    plan = {"config": cfg_source, "device": str(device), "samples": len(indices),
            "frames_per_video": output_frames(num_frames, opts.n_rounds),
            "settings": dataclasses.asdict(opts)}
    if opts.dry_run:
        return {**plan, **describe_model(cfg, opts, device)}
    model = load_model(opts, cfg)
    assert model.num_frames == num_frames, (model.num_frames, num_frames)
    apply_cudnn_benchmark(opts, device)
    compile_unet = opts.compile == "on" or (opts.compile == "auto" and device.type == "cuda")
    bf16_decode = opts.decode_dtype == "bf16" or (opts.decode_dtype == "auto" and device.type == "cuda")
    placement = Placement(model, device, low_vram=opts.low_vram, compile_unet=compile_unet, fp8=opts.fp8,
                          decode_dtype=torch.bfloat16 if bf16_decode else None)
    os.makedirs(opts.save, exist_ok=True)
    records, started = [], time.perf_counter()
    for first in tqdm(range(0, len(indices), opts.batch_size), desc="batches", unit="batch", file=sys.stderr):
        batch = indices[first:first + opts.batch_size]
        names = [f"{opts.dataset.lower()}_{i:06d}" for i in batch]
        items = [source.load(i) for i in batch]
        actions, missing = round_actions(opts, items, plan_actions)
        for name, lacks in zip(names, missing):
            if lacks:
                log.warning("%s: the clip has no %s; the model sees it as absent", name, ", ".join(lacks))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        video, rewards, timings = sample_batch(model, placement, opts, batch, items, actions)
        peak, peak_kind = peak_memory(device)
        for j, (index, name) in enumerate(zip(batch, names)):
            folder = os.path.join(opts.save, name)
            record = {
                "name": name, "dataset": opts.dataset, "index": index, "source": items[j].source,
                "seed": opts.seed, "sample_seed": step_seed(opts.seed, index),
                "frames": plan["frames_per_video"],
                "actions": {"from": "json" if opts.actions_json else f"dataset:{opts.action or 'free'}",
                            "missing": missing[j], "rounds": [shown_actions(a, j) for a in actions]},
                "files": write_outputs(folder, video[j], items[j].gt, opts), "batch": names,
                "timings_s": {k: round(v, 4) for k, v in timings.items()},
                "peak_memory_gib": round(peak, 3), "peak_memory_kind": peak_kind, "device": str(device),
                "config": cfg_source, "settings": dataclasses.asdict(opts),
            }
            if rewards is not None:
                record.update(reward=rewards[j], ens_size=opts.ens_size)
            with open(os.path.join(folder, "sample.json"), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            records.append(record)
    if opts.reward:
        write_rewards(os.path.join(opts.save, "rewards.csv"), records, opts)
    outputs = [{"name": r["name"], **({"reward": r["reward"]} if opts.reward else {})} for r in records]
    summary = {**plan, "seconds": round(time.perf_counter() - started, 3), "outputs": outputs}
    with open(os.path.join(opts.save, "run.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary
