"""The evaluation run behind `evaluate.py`: generate the evaluation set shard by shard, measure each clip, and
summarise when every clip is done.

Sharding: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK) or SLURM (SLURM_PROCID / SLURM_NTASKS) process r of
W takes the clips whose index is r mod W, on cuda:LOCAL_RANK; processes never talk to each other, they share
the output folder (a shared file system across nodes). Resuming: rerun the same command (any number of
processes); clips whose record exists are skipped, so no finished clip is generated twice. The process that
finds every clip done writes summary.json; `--summarize_only` recomputes it from the records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vwm.data.base import Clip
from vwm.data.nuscenes import NuScenesSubset
from vwm.data.toyworld import ToyWorldSubset
from vwm.eval import store as st
from vwm.eval.action_score import score_clip
from vwm.eval.action_validation import toy_intrinsics
from vwm.eval.egomotion import Intrinsics, NUSCENES_CAM_FRONT
from vwm.eval.features import FeatureNetworks, build_feature_networks
from vwm.eval.generate import generate
from vwm.eval.protocol import PRESETS, Protocol
from vwm.eval.weights import sha256_of
from vwm.media import write_mp4
from vwm.rollout import Placement
from vwm.sampling.model import configured_frames, load_model, model_config
from vwm.sampling.options import SampleOptions

log = logging.getLogger(__name__)

TOY_CLIPS = 100
"""Clips of the TOY evaluation set (toy-world clips of --toy_seed), as sample.py's TOY data set."""


@dataclass
class EvalOptions:
    """Everything an evaluation run needs (the evaluate.py flags); None protocol fields keep the preset's."""

    out: str
    ckpt: str | None = None
    config: list[str] | None = None
    preset: str = "vista"
    data_root: str = "data/nuscenes"
    anno_file: str = "annos/nuScenes_val.json"
    toy_seed: int = 1
    inception: str | None = None
    i3d: str | None = None
    inception_sha256: str | None = None
    i3d_sha256: str | None = None
    allow_unverified_weights: bool = False
    random_feature_weights: bool = False
    real_cache: str | None = None
    limit: int | None = None
    batch_size: int = 1
    device: str = "auto"
    low_vram: bool = False
    compile: str = "auto"
    intrinsics: list[float] | None = None
    save_videos: bool = False
    summarize_only: bool = False
    dry_run: bool = False
    # protocol overrides
    height: int | None = None
    width: int | None = None
    action: str | None = None
    n_steps: int | None = None
    cfg_scale: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    seed: int | None = None
    fvd_frames: list[int] | None = None
    metrics: list[str] | None = None
    fid_normalize: str | None = None


def shard_of_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun or SLURM variables; (0, 1, 0) when neither is set."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def resolve_protocol(opts: EvalOptions) -> Protocol:
    """The preset with the command line's overrides."""
    if opts.preset not in PRESETS:
        raise ValueError(f"--preset={opts.preset!r} is invalid; allowed: {', '.join(PRESETS)}")
    return PRESETS[opts.preset].replace(
        height=opts.height, width=opts.width, action=opts.action, n_steps=opts.n_steps, cfg_scale=opts.cfg_scale,
        sigma_min=opts.sigma_min, sigma_max=opts.sigma_max, seed=opts.seed,
        fvd_frames=tuple(opts.fvd_frames) if opts.fvd_frames is not None else None,
        metrics=tuple(opts.metrics) if opts.metrics is not None else None, fid_normalize=opts.fid_normalize)


def resolve_device(name: str, local_rank: int) -> torch.device:
    """auto -> cuda:LOCAL_RANK if CUDA is available, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name} is invalid: CUDA is not available; allowed: auto, cpu")
    return device


def open_dataset(protocol: Protocol, opts: EvalOptions, num_frames: int) -> Any:
    """The evaluation clips: the annotation file's clips in order (no re-balancing), or toy-world clips."""
    if protocol.dataset == "NUSCENES":
        for flag, path, check in (("data_root", opts.data_root, os.path.isdir),
                                  ("anno_file", opts.anno_file, os.path.isfile)):
            if not check(path):
                raise FileNotFoundError(f"--{flag}={path!r} does not exist")

        return NuScenesSubset(opts.data_root, opts.anno_file, num_frames=num_frames,
                              target_height=protocol.height, target_width=protocol.width, turn_repeat=1,
                              complete_repeat=1, jpeg_draft=False)

    return ToyWorldSubset(num_frames, protocol.height, protocol.width, length=TOY_CLIPS, seed=opts.toy_seed)


def intrinsics_of(protocol: Protocol, opts: EvalOptions) -> Intrinsics:
    """The camera intrinsics of the evaluation frames (for the action score)."""
    if protocol.dataset == "TOY" and opts.intrinsics is None:
        return toy_intrinsics(protocol.height, protocol.width)
    full = tuple(opts.intrinsics) if opts.intrinsics is not None else NUSCENES_CAM_FRONT
    if len(full) != 4:
        raise ValueError(f"--intrinsics={list(full)} is invalid; allowed: fx fy cx cy of the 1600x900 image")
    return Intrinsics.from_full_frame(full, protocol.height, protocol.width)  # type: ignore[arg-type]


def measure(frames: torch.Tensor, clip: Clip, protocol: Protocol, nets: FeatureNetworks,
            intrinsics: Intrinsics) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, float]]:
    """(action score or None, feature arrays, seconds) of one uint8 clip (T, 3, H, W)."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    fid = nets.frame_features(frames[protocol.fid_skip_frames:]) if "fid" in protocol.metrics else None
    fvd = nets.clip_features(frames, protocol.fvd_frames) if "fvd" in protocol.metrics else None
    seconds["features"] = time.perf_counter() - start
    start = time.perf_counter()
    action = None
    if "action" in protocol.metrics and "trajectory" in clip.actions:
        action = score_clip(frames.numpy(), clip.actions["trajectory"].numpy(), intrinsics).to_json()
    seconds["action"] = time.perf_counter() - start
    return action, st.feature_arrays(fid, fvd), seconds


def _identity(protocol: Protocol, opts: EvalOptions, nets_weights: dict[str, str],
              intrinsics: Intrinsics) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run identity: must match when resuming; real-feature identity: the cache key's content). Neither holds
    the clip count, so a run started with --limit can be extended to more clips, reusing what is done."""
    data: dict[str, Any] = {"dataset": protocol.dataset}
    if protocol.dataset == "NUSCENES":
        data.update(anno_sha256=sha256_of(opts.anno_file), data_root=os.path.abspath(opts.data_root))
    else:
        data.update(toy_seed=opts.toy_seed)
    ckpt = None
    if opts.ckpt is not None:
        size = os.path.getsize(opts.ckpt) if os.path.isfile(opts.ckpt) else None
        ckpt = {"path": os.path.abspath(opts.ckpt), "bytes": size}
    real = {"data": data, "height": protocol.height, "width": protocol.width, "fid_skip": protocol.fid_skip_frames,
            "fid_normalize": protocol.fid_normalize, "fvd_frames": list(protocol.fvd_frames),
            "metrics": list(protocol.metrics), "weights": nets_weights,
            "intrinsics": dataclasses.asdict(intrinsics)}
    protocol_fields = {k: v for k, v in dataclasses.asdict(protocol).items() if k != "expected_clips"}
    run = {"protocol": protocol_fields, "ckpt": ckpt, "config": opts.config, "real": real}
    return run, real


def _check_run_file(path: str, identity: dict[str, Any]) -> None:
    if not os.path.isfile(path):
        st.atomic_write_json(path, identity)
        return
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    normal = json.loads(json.dumps(identity, sort_keys=True))
    if previous != normal:
        changed = sorted(k for k in set(previous) | set(normal) if previous.get(k) != normal.get(k))
        raise ValueError(f"--out={os.path.dirname(path)!r} holds an evaluation of a different run (differs in: "
                         f"{', '.join(changed)}; see {path}); use a new --out, or the same settings to resume")


def run_evaluation(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate this process's shard, then summarise if every clip is done; returns the summary or a status."""
    protocol = resolve_protocol(opts)
    rank, world, local_rank = shard_of_environment()
    device = resolve_device(opts.device, local_rank)
    if opts.limit is not None and opts.limit < 1:
        raise ValueError(f"--limit={opts.limit} is invalid; allowed: >= 1")
    if opts.batch_size < 1:
        raise ValueError(f"--batch_size={opts.batch_size} is invalid; allowed: >= 1")
    cfg = _model_config(opts)
    num_frames = configured_frames(cfg)
    protocol.validate(num_frames)
    dataset = open_dataset(protocol, opts, num_frames)
    count = len(dataset) if opts.limit is None else min(opts.limit, len(dataset))
    names = [f"{protocol.dataset.lower()}_{i:06d}" for i in range(count)]
    intrinsics = intrinsics_of(protocol, opts)
    mine = [i for i in range(count) if i % world == rank]
    plan = {"protocol": dataclasses.asdict(protocol), "clips": count, "rank": rank, "world_size": world,
            "device": str(device), "shard_clips": len(mine), "out": opts.out}
    if opts.dry_run:
        return plan
    nets = build_feature_networks(device, protocol.metrics, opts.inception, opts.i3d,
                                  inception_sha256=opts.inception_sha256, i3d_sha256=opts.i3d_sha256,
                                  verify=not opts.allow_unverified_weights,
                                  random_weights=opts.random_feature_weights, fid_normalize=protocol.fid_normalize)
    identity, real_identity = _identity(protocol, opts, nets.weights, intrinsics)
    os.makedirs(opts.out, exist_ok=True)
    _check_run_file(os.path.join(opts.out, "run.json"), identity)
    generated = st.ClipStore(os.path.join(opts.out, "clips"))
    real_root = opts.real_cache or os.path.join(opts.out, "real_features")
    real = st.ClipStore(os.path.join(real_root, st.cache_key(real_identity)))
    if not os.path.isfile(os.path.join(real.folder, "identity.json")):
        st.atomic_write_json(os.path.join(real.folder, "identity.json"), real_identity)
    pending = [i for i in mine if not (generated.done(names[i]) and real.done(names[i]))]
    if pending and not opts.summarize_only:
        _evaluate_shard(opts, protocol, cfg, dataset, names, pending, generated, real, nets, intrinsics, device,
                        rank, world)
    remaining = [n for n in names if not (generated.done(n) and real.done(n))]
    if remaining:
        log.info("%d of %d clips not done yet (other shards)", len(remaining), count)
        return {**plan, "done": count - len(remaining), "remaining": len(remaining), "summary": None}
    summary = _summary(protocol, opts, names, generated, real, nets, identity)
    st.atomic_write_json(os.path.join(opts.out, "summary.json"), summary)
    return {**plan, "done": count, "remaining": 0, "summary": summary}


def _model_config(opts: EvalOptions) -> Any:
    if opts.ckpt is None:
        raise ValueError("--ckpt is required: the weights of the model to evaluate")
    if not os.path.exists(opts.ckpt):
        raise FileNotFoundError(f"--ckpt={opts.ckpt!r} does not exist")
    cfg, _ = model_config(SampleOptions(ckpt=opts.ckpt, config=opts.config))
    return cfg


def _evaluate_shard(opts: EvalOptions, protocol: Protocol, cfg: Any, dataset: Any, names: list[str],
                    pending: list[int], generated: st.ClipStore, real: st.ClipStore, nets: FeatureNetworks,
                    intrinsics: Intrinsics, device: torch.device, rank: int, world: int) -> None:
    model = load_model(SampleOptions(ckpt=opts.ckpt, config=opts.config), cfg)
    compile_unet = opts.compile == "on" or (opts.compile == "auto" and device.type == "cuda")
    placement = Placement(model, device, low_vram=opts.low_vram, compile_unet=compile_unet)
    run_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    events = os.path.join(opts.out, "events.jsonl")
    bar = tqdm(total=len(pending), unit="clip", desc=f"evaluate (rank {rank}/{world})", file=sys.stderr,
               disable=rank != 0, dynamic_ncols=True, smoothing=0.1)
    for first in range(0, len(pending), opts.batch_size):
        batch = pending[first:first + opts.batch_size]
        size = len(batch)
        start = time.perf_counter()
        clips = [dataset.load_clip(i) for i in batch]
        load_s = time.perf_counter() - start
        for i, clip in zip(batch, clips):
            if not real.done(names[i]):
                action, arrays, seconds = measure(clip.frames, clip, protocol, nets, intrinsics)
                real.write(names[i], {"name": names[i], "index": i, "source": clip.source, "action": action,
                                      "seconds": seconds}, arrays)
        todo = [j for j, i in enumerate(batch) if not generated.done(names[i])]  # real features may be all it lacked
        if not todo:
            bar.update(size)
            continue
        batch, clips = [batch[j] for j in todo], [clips[j] for j in todo]
        start = time.perf_counter()
        out = generate(model, placement, clips, batch, protocol)
        gen_s = time.perf_counter() - start
        for j, (i, clip) in enumerate(zip(batch, clips)):
            video = out.videos[j]
            action, arrays, seconds = measure(video, clip, protocol, nets, intrinsics)
            seconds.update(generate=gen_s / len(batch), load=load_s / size)
            seconds["clip"] = seconds["generate"] + seconds["features"] + seconds["action"]
            if opts.save_videos:
                write_mp4(video.permute(0, 2, 3, 1).numpy(), os.path.join(opts.out, "videos", f"{names[i]}.mp4"))
            record = {"name": names[i], "index": i, "source": clip.source, "action": action,
                      "seconds": {k: round(v, 4) for k, v in seconds.items()},
                      "stages_s": {k: round(v / len(batch), 4) for k, v in out.timings.items()},
                      "device": device_name, "run": run_id, "rank": rank, "world_size": world,
                      "batch": [names[b] for b in batch]}
            generated.write(names[i], record, arrays)
            st.append_event(events, {"name": names[i], "run": run_id, "rank": rank, "time": time.time()})
        bar.update(size)
        if rank != 0:
            log.info("rank %d: %d / %d clips", rank, first + size, len(pending))
    bar.close()


def _summary(protocol: Protocol, opts: EvalOptions, names: list[str], generated: st.ClipStore,
             real: st.ClipStore, nets: FeatureNetworks, identity: dict[str, Any]) -> dict[str, Any]:
    result = st.summarize(names, generated, real, protocol.fvd_frames, protocol.metrics)
    reference = PRESETS["vista"]
    differences = protocol.differences(reference)
    per_clip = result.get("seconds_per_clip")
    full = protocol.expected_clips or len(names)
    result.update(
        protocol=dataclasses.asdict(protocol), weights=nets.weights, run=identity,
        comparable_to_vista_protocol=not differences and len(names) == reference.expected_clips
        and "random" not in nets.weights.values() and not opts.allow_unverified_weights,
        differences_from_vista_protocol=differences,
        projected_hours_full_set_one_process=round(full * per_clip / 3600, 2) if per_clip else None,
        full_set_clips=full,
    )
    return result
