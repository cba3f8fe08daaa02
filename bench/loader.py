"""Throughput of the real training data loader (VideoDataModule, DataLoader workers, decode + crop + resize) on
OpenDV-format data it writes itself: JPEG frame folders and H.264 mp4s; one JSON line per (format, workers).

    python bench/loader.py --data /tmp/loader-data --workers 4 16 32 --height 576 --width 1024

The clips/s of a line is what one training process with that many workers receives; compare it with what the
GPUs consume (clips/s per GPU from bench/train_step.py) times the GPUs that share the host's cores. The data is
written once per --data folder (smooth synthetic scenes with texture at --source-size, so JPEG and H.264 decode
costs are those of camera frames rather than of noise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import vwm  # noqa: E402,F401  (torchvision shim first)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vwm.data.datamodule import VideoDataModule  # noqa: E402


def scene(index: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A road-like frame: sky and ground gradients, a moving lane pattern and mild texture (uint8 HxWx3)."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    horizon = y < 0.45
    image = np.empty((height, width, 3), dtype=np.float32)
    image[..., 0] = np.where(horizon, 120 + 80 * y, 70 + 40 * y)
    image[..., 1] = np.where(horizon, 160 + 60 * y, 70 + 40 * y)
    image[..., 2] = np.where(horizon, 230 - 40 * y, 75 + 30 * y)
    lanes = (~horizon) & (np.abs((x - 0.5) / np.maximum(y - 0.44, 1e-3) % 0.8 - 0.4) < 0.02) & (
        ((y * 20 + index * 0.3) % 2) < 1)
    image[lanes] = 235
    image += rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_data(root: str, n_sources: int, frames: int, width: int, height: int) -> None:
    """Write `n_sources` frame folders (%09d.jpg) under root/frames and as many mp4s under root/videos."""
    import av

    rng = np.random.default_rng(0)
    for s in range(n_sources):
        folder = os.path.join(root, "frames", f"seq{s:03d}")
        os.makedirs(folder, exist_ok=True)
        video = os.path.join(root, "videos", f"seq{s:03d}.mp4")
        os.makedirs(os.path.dirname(video), exist_ok=True)
        with av.open(video, "w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"g": "10", "preset": "veryfast", "crf": "20"}
            for i in range(frames):
                image = scene(i + 7 * s, width, height, rng)
                Image.fromarray(image).save(os.path.join(folder, f"{i:09d}.jpg"), quality=92)
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    with open(os.path.join(root, "DONE"), "w") as f:
        f.write(json.dumps({"sources": n_sources, "frames": frames, "size": [width, height]}))


def measure(root: str, kind: str, workers: int, args: argparse.Namespace) -> dict:
    """Clips/s of the train dataloader over --batches batches after --warmup batches."""
    dm = VideoDataModule(
        batch_size=args.batch, num_workers=workers, prefetch_factor=args.prefetch, pin_memory=False,
        persistent_workers=False, target_height=args.height, target_width=args.width, num_frames=args.frames,
        seed=0, subsets=[{"target": "vwm.data.opendv.OpenDVSubset",
                          "params": {"data_root": os.path.join(root, kind), "anno_file": None}}])
    dm.setup(rank=0, world_size=1)
    loader = iter(dm.train_dataloader())
    for _ in range(args.warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(loader)
    seconds = time.perf_counter() - start
    del loader
    clips = args.batches * args.batch
    return {"format": "jpeg" if kind == "frames" else "mp4", "workers": workers, "clips_per_s": round(clips / seconds, 3),
            "clip": f"{args.frames}x{args.height}x{args.width}", "source": f"{args.source_width}x{args.source_height}",
            "batches": args.batches, "batch": args.batch, "cpus": os.cpu_count(),
            "frames_dtype": str(batch["img_seq"].dtype).removeprefix("torch.")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder for the generated data (reused when complete)")
    p.add_argument("--workers", type=int, nargs="+", default=[4])
    p.add_argument("--formats", nargs="+", choices=["jpeg", "mp4"], default=["jpeg", "mp4"])
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--source-width", type=int, default=1280)
    p.add_argument("--source-height", type=int, default=720)
    p.add_argument("--sources", type=int, default=4, help="frame folders and videos to write")
    p.add_argument("--source-frames", type=int, default=60)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=16)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.data, "DONE")):
        make_data(args.data, args.sources, args.source_frames, args.source_width, args.source_height)
    for fmt in args.formats:
        for workers in args.workers:
            line = measure(args.data, "frames" if fmt == "jpeg" else "videos", workers, args)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
