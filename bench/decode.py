"""Decode throughput of the data pipeline: clips/s per core for 25-frame clips at 320x576 and 576x1024, from
JPEG frame folders (full decode as the reference does it, and with the reduced-size JPEG draft) and from an
H.264 mp4 (decord, resized while decoding). One process, one thread: the numbers are per CPU core.

    python bench/decode.py --clips 5
prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from vwm.data.opendv import OpenDVSubset
from vwm.data.video import to_unit_range

TARGETS = ((320, 576), (576, 1024))


def _scene(width: int, height: int, frames: int, seed: int = 0) -> list[np.ndarray]:
    """Camera-like frames: matplotlib's sample photo, panned across frames, with sensor noise."""
    import matplotlib

    sample = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    photo = Image.open(sample).convert("RGB")
    wide_w = int(width * 1.5)
    wide = np.asarray(photo.resize((wide_w, int(wide_w * photo.height / photo.width)), Image.BICUBIC))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(frames):
        x = int(i * (wide.shape[1] - width) / max(frames - 1, 1))
        crop = wide[:height, x:x + width].astype(np.float32) + rng.normal(0, 3, (height, width, 3))
        out.append(crop.clip(0, 255).astype(np.uint8))
    return out


def _write_jpegs(root: str, frames: list[np.ndarray]) -> None:
    os.makedirs(os.path.join(root, "clip"), exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(root, "clip", f"{i:09d}.jpg"), quality=90)


def _write_mp4(path: str, frames: list[np.ndarray], fps: int, gop: int) -> None:
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(gop), "preset": "veryfast", "crf": "23"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _time(subset: OpenDVSubset, clips: int, as_float: bool) -> list[float]:
    times = []
    for i in range(clips + 1):  # the first clip warms caches and is dropped
        start = time.perf_counter()
        frames = subset.load_clip(i % len(subset)).frames
        if as_float:
            to_unit_range(frames)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    """Run every configuration and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=5, help="timed clips per configuration")
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--jpeg-size", default="1600x900", help="source JPEG size (nuScenes CAM_FRONT)")
    parser.add_argument("--video-size", default="1920x1080", help="source video size (OpenDV YouTube)")
    parser.add_argument("--video-fps", type=int, default=30,
                        help="source video rate; clips sample it at 10 fps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    jpeg_w, jpeg_h = map(int, args.jpeg_size.split("x"))
    video_w, video_h = map(int, args.video_size.split("x"))
    step = max(1, round(args.video_fps / 10))
    with tempfile.TemporaryDirectory() as tmp:
        _write_jpegs(os.path.join(tmp, "jpeg"), _scene(jpeg_w, jpeg_h, args.frames + args.clips))
        source_frames = (args.frames - 1) * step + 1 + args.clips
        os.makedirs(os.path.join(tmp, "mp4"))
        _write_mp4(os.path.join(tmp, "mp4", "drive.mp4"), _scene(video_w, video_h, source_frames, seed=1),
                   args.video_fps, gop=2 * args.video_fps)
        jpeg_bytes = os.path.getsize(os.path.join(tmp, "jpeg", "clip", "000000000.jpg"))
        for height, width in TARGETS:
            size = {"num_frames": args.frames, "target_height": height, "target_width": width}
            configs = [
                ("jpeg_reference", f"{jpeg_w}x{jpeg_h} jpg ({jpeg_bytes // 1024} KiB)", True,
                 OpenDVSubset(os.path.join(tmp, "jpeg"), None, jpeg_draft=False, **size)),
                ("jpeg_draft", f"{jpeg_w}x{jpeg_h} jpg ({jpeg_bytes // 1024} KiB)", False,
                 OpenDVSubset(os.path.join(tmp, "jpeg"), None, jpeg_draft=True, **size)),
                ("mp4_decord", f"{video_w}x{video_h} h264 {args.video_fps} fps, frame step {step}", False,
                 OpenDVSubset(os.path.join(tmp, "mp4"), None, video_fps=10.0, **size)),
            ]
            for name, source, as_float, subset in configs:
                times = _time(subset, args.clips, as_float)
                median = statistics.median(times)
                print(json.dumps({
                    "config": f"{name}_{args.frames}x{height}x{width}", "source": source,
                    "output": "float32 [-1,1]" if as_float else "uint8", "clips": len(times),
                    "sec_per_clip_median": round(median, 4), "sec_per_clip_min": round(min(times), 4),
                    "sec_per_clip_max": round(max(times), 4), "clips_per_s_per_core": round(1.0 / median, 3),
                    "frames_per_s_per_core": round(args.frames / median, 1)}), flush=True)


if __name__ == "__main__":
    main()
