"""Throughput of the Vista-protocol evaluation on one device: seconds per clip for generation (25x576x1024,
50 Euler steps, CFG 2.5, one condition frame, action-free), the FID / FVD features of the generated and the
real clip, and the action score, with random weights of the full-size Vista config and of both feature
networks. Prints one JSON line per timed clip and a final line with clips/s and the projected wall time of the
full evaluation set (5369 clips) on one device and on 8.

    python bench/evaluate.py                     # GPU, defaults: the vista protocol, 3 timed clips
    python bench/evaluate.py --config configs/tiny/model.yaml model.params.num_frames=9 --height 64 --width 64
    \
        --frames 9 --steps 2 --fvd_frames 9 --clips 1 --device cpu        # the same code path on a CPU

The clips are toy-world clips rendered at the protocol's size (real frames, the real clip's features and
ground-truth action score are measured for every clip, as the first evaluation of a data set does; later
evaluations read them from the cache, see `real_s`). A warm-up clip with 2 steps runs first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import vwm  # noqa: E402,F401  (torchvision shim before open_clip / Lightning)
from vwm.config import build_model, load_config  # noqa: E402
from vwm.data.toyworld import ToyWorldSubset  # noqa: E402
from vwm.eval.action_validation import toy_intrinsics  # noqa: E402
from vwm.eval.features import build_feature_networks  # noqa: E402
from vwm.eval.generate import generate  # noqa: E402
from vwm.eval.protocol import PRESETS, VISTA_VAL_CLIPS  # noqa: E402
from vwm.eval.runner import measure  # noqa: E402
from vwm.rollout import Placement  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    """Time `--clips` clips of the evaluation pipeline and print JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "inference", "vista.yaml"))
    p.add_argument("overrides", nargs="*", help="config overrides a.b=c")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg_scale", type=float, default=2.5)
    p.add_argument("--fvd_frames", type=int, nargs="+", default=[25, 16])
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--low_vram", action="store_true")
    p.add_argument("--compile", action="store_true", help="compile the UNet's layers (evaluate.py's CUDA default)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="default: the protocol's (FID, FVD, action score); e.g. `fid fvd` on a host without "
                        "OpenCV, whose action score then runs on the CPU host that scores the clips")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    protocol = PRESETS["vista"].replace(height=args.height, width=args.width, n_steps=args.steps,
                                        cfg_scale=args.cfg_scale, fvd_frames=tuple(args.fvd_frames))
    if args.metrics:
        protocol = protocol.replace(metrics=tuple(args.metrics))
    protocol.validate(args.frames)
    model = build_model(load_config(args.config, args.overrides), device=device)
    if model.num_frames != args.frames:
        raise SystemExit(f"--frames={args.frames} is invalid; allowed: {model.num_frames} (the config's)")
    placement = Placement(model, device, low_vram=args.low_vram, compile_unet=args.compile)
    nets = build_feature_networks(device, protocol.metrics, random_weights=True)
    data = ToyWorldSubset(args.frames, args.height, args.width, length=1000, seed=1)
    intrinsics = toy_intrinsics(args.height, args.width)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def one_batch(indices: list[int], proto) -> dict:
        start = time.perf_counter()
        clips = [data.load_clip(i) for i in indices]
        render_s = time.perf_counter() - start
        start = time.perf_counter()
        for clip in clips:
            measure(clip.frames, clip, proto, nets, intrinsics)
        _sync(device)
        real_s = time.perf_counter() - start
        start = time.perf_counter()
        out = generate(model, placement, clips, indices, proto)
        _sync(device)
        gen_s = time.perf_counter() - start
        start = time.perf_counter()
        seconds = {"features": 0.0, "action": 0.0}
        for j, clip in enumerate(clips):
            _, _, s = measure(out.videos[j], clip, proto, nets, intrinsics)
            for k in seconds:
                seconds[k] += s[k]
        _sync(device)
        measure_s = time.perf_counter() - start
        n = len(indices)
        return {"clips": n, "generate_s": round(gen_s / n, 3), "features_s": round(seconds["features"] / n, 3),
                "action_s": round(seconds["action"] / n, 3), "measure_s": round(measure_s / n, 3),
                "real_s": round(real_s / n, 3), "render_s": round(render_s / n, 3),
                "stages_s": {k: round(v / n, 3) for k, v in out.timings.items()}}

    one_batch(list(range(args.batch_size)), dataclasses.replace(protocol, n_steps=2))  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for b in range(args.clips):
        first = args.batch_size * (b + 1)
        row = one_batch(list(range(first, first + args.batch_size)), protocol)
        row.update(device=device_name, clip=f"{args.frames}x{args.height}x{args.width}", steps=args.steps)
        print(json.dumps(row), flush=True)
        rows.append(row)
    per_clip = sum(r["generate_s"] + r["measure_s"] for r in rows) / len(rows)
    with_real = per_clip + sum(r["real_s"] for r in rows) / len(rows)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(json.dumps({
        "summary": True, "device": device_name, "batch_size": args.batch_size, "timed_batches": len(rows),
        "seconds_per_clip": round(per_clip, 3), "clips_per_s": round(1 / per_clip, 5),
        "seconds_per_clip_first_run_with_real_features": round(with_real, 3),
        "projected_hours_5369_clips_1_device": round(VISTA_VAL_CLIPS * with_real / 3600, 2),
        "projected_hours_5369_clips_8_devices": round(VISTA_VAL_CLIPS * with_real / 3600 / 8, 2),
        "peak_gib": round(peak, 2) if peak is not None else None,
        "protocol": {"n_steps": args.steps, "cfg_scale": args.cfg_scale, "fvd_frames": args.fvd_frames,
                     "metrics": list(protocol.metrics)},
    }), flush=True)


if __name__ == "__main__":
    main()
