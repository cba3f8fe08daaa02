"""`evaluate.py`: FID, FVD and action following of a world model under a written protocol (docs/evaluation.md).

    python evaluate.py --ckpt ckpts/vista.safetensors --data_root data/nuscenes \
        --anno_file annos/nuScenes_val.json --inception weights/pt_inception-2015-12-05-6726825d.pth \
        --i3d weights/i3d_pretrained_400.pt --out outputs/eval_vista
    torchrun --nproc_per_node 8 evaluate.py ...      # sharded; rerun the same command to resume
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from vwm.checkpoint import CheckpointError
from vwm.eval.protocol import METRICS, PRESETS
from vwm.eval.runner import EvalOptions, run_evaluation
from vwm.eval.weights import FeatureWeightsError


def parser() -> argparse.ArgumentParser:
    """The evaluate.py argument parser."""
    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a world model: FID, FVD and action "
                                "following on a protocol preset (docs/evaluation.md).")
    p.add_argument("--ckpt", help="model weights (vwm safetensors export with its config, or any weight "
                   "format with --config)")
    p.add_argument("--config", nargs="+", metavar="YAML", help="model config(s), if the checkpoint has none")
    p.add_argument("--preset", choices=sorted(PRESETS), default="vista",
                   help="protocol preset (default: vista, the paper's nuScenes protocol)")
    p.add_argument("--out", required=True, help="output folder: per-clip records, summary.json; rerun to resume")
    data = p.add_argument_group("data")
    data.add_argument("--data_root", default="data/nuscenes", help="nuScenes root of the annotation's paths")
    data.add_argument("--anno_file", default="annos/nuScenes_val.json",
                      help="annotation JSON (the published val file has the 5369 clips of the vista preset)")
    data.add_argument("--toy_seed", type=int, default=1, help="toy preset: world seed of the clips")
    data.add_argument("--limit", type=int, default=None, help="only the first N clips (quick checks)")
    data.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"),
                      help="camera intrinsics in the 1600x900 image for the action score (default: nominal "
                      "nuScenes CAM_FRONT)")
    feat = p.add_argument_group("feature networks (local files; nothing is downloaded)")
    feat.add_argument("--inception", help="FID Inception weights pt_inception-2015-12-05-6726825d.pth")
    feat.add_argument("--i3d", help="FVD I3D weights i3d_pretrained_400.pt")
    feat.add_argument("--inception_sha256", help="expected SHA-256 (or prefix) instead of the published 6726825d")
    feat.add_argument("--i3d_sha256", help="expected SHA-256 (or prefix) of the I3D file (none is published)")
    feat.add_argument("--allow_unverified_weights", action="store_true",
                      help="warn instead of failing on a checksum mismatch (the summary says: not comparable)")
    feat.add_argument("--random_feature_weights", action="store_true",
                      help="random feature-network weights: for tests and speed benchmarks only")
    feat.add_argument("--real_cache", help="folder of cached real-set features (default: OUT/real_features); "
                      "share it between evaluations of the same data")
    proto = p.add_argument_group("protocol overrides (default: the preset's; any change is listed in the "
                                 "summary as a difference from the vista protocol)")
    proto.add_argument("--height", type=int)
    proto.add_argument("--width", type=int)
    proto.add_argument("--action", choices=["free", "traj", "trajectory", "cmd", "command", "steer", "goal"],
                       help="ground-truth action shown to the model (vista: free)")
    proto.add_argument("--n_steps", type=int)
    proto.add_argument("--cfg_scale", type=float)
    proto.add_argument("--sigma_min", type=float)
    proto.add_argument("--sigma_max", type=float)
    proto.add_argument("--seed", type=int, help="clip i draws its noise from (seed, i)")
    proto.add_argument("--fvd_frames", type=int, nargs="+", help="FVD clip lengths (vista: 25 16)")
    proto.add_argument("--metrics", nargs="+", choices=list(METRICS), help="metrics to compute (default: all)")
    proto.add_argument("--fid_normalize", choices=["torchmetrics", "pytorch_fid"],
                       help="Inception preprocessing convention (vista: torchmetrics, as the paper)")
    run = p.add_argument_group("running")
    run.add_argument("--batch_size", type=int, default=1, help="clips generated together")
    run.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK, else cpu), cpu, cuda:N")
    run.add_argument("--low_vram", action="store_true", help="only the module in use on the GPU")
    run.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                     help="torch.compile the UNet's layers (auto: on CUDA), as sample.py --compile")
    run.add_argument("--save_videos", action="store_true", help="also write OUT/videos/<clip>.mp4")
    run.add_argument("--summarize_only", action="store_true", help="recompute summary.json from the records")
    run.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                     help="print the resolved protocol and the shard plan, then exit")
    return p


def _headline(summary: dict) -> str:
    parts = [f"{summary['clips']} clips"]
    for key in ("fid", "fvd_25", "fvd_16"):
        if summary.get(key) is not None:
            parts.append(f"{key.upper().replace('_', '-')} {summary[key]:.2f}")
    for key in sorted(k for k in summary if k.startswith("fvd_") and k not in ("fvd_25", "fvd_16")
                      and not k.endswith("_samples")):
        if summary[key] is not None:
            parts.append(f"{key.upper().replace('_', '-')} {summary[key]:.2f}")
    action = summary.get("action_following")
    if action and action.get("heading_error_deg") is not None:
        rho = action.get("final_heading_spearman")
        parts.append(f"heading error {action['heading_error_deg']:.2f} deg" +
                     (f" (rank corr. {rho:.3f})" if rho is not None else ""))
    if summary.get("clips_per_s_per_process"):
        parts.append(f"{summary['clips_per_s_per_process']:.4f} clips/s per process")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print the summary; returns the exit code (2 for a user error)."""
    try:
        args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # argparse's usage errors (2) and --help (0)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opts = EvalOptions(**vars(args))
    try:
        result = run_evaluation(opts)
    except (ValueError, FileNotFoundError, CheckpointError, FeatureWeightsError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    if opts.dry_run:
        print(json.dumps(result, indent=1))
        return 0
    if result["summary"] is None:
        print(f"rank {result['rank']}: shard done; {result['remaining']} of {result['clips']} clips remain on "
              f"other shards (the last process to finish writes {opts.out}/summary.json)")
        return 0
    print(f"{_headline(result['summary'])}; summary: {opts.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
