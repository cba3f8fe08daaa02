"""Writing videos and image grids: mp4 (H.264 through PyAV), gif, PNG frames and grids."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(T,3,H,W) float in [-1,1] (or uint8) -> (T,H,W,3) uint8."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a (T,3,H,W) video, got shape {tuple(video.shape)}")
    if video.dtype != torch.uint8:
        video = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 1).cpu().numpy()


def write_mp4(frames: np.ndarray, path: str, fps: float = 10.0, crf: int = 18) -> str:
    """Write (T,H,W,3) uint8 frames as an H.264 mp4 (even-sized, yuv420p) and return the path."""
    import av

    t, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:  # yuv420p needs even sides
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial.mp4"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "threads": "1"}  # single-threaded x264: identical frames, identical file
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def write_gif(frames: np.ndarray, path: str, fps: float = 10.0) -> str:
    """Write (T,H,W,3) uint8 frames as a looping gif and return the path."""
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def write_pngs(frames: np.ndarray, folder: str, prefix: str = "frame") -> list[str]:
    """Write each (H,W,3) frame as folder/prefix_000.png."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        paths.append(os.path.join(folder, f"{prefix}_{i:03d}.png"))
        Image.fromarray(frame).save(paths[-1])
    return paths


def side_by_side(*videos: np.ndarray, gap: int = 4) -> np.ndarray:
    """Horizontally stack (T,H,W,3) videos of equal T and H with a white gap."""
    t = min(v.shape[0] for v in videos)
    h = max(v.shape[1] for v in videos)
    parts = []
    for i, v in enumerate(videos):
        v = v[:t]
        if v.shape[1] < h:
            v = np.pad(v, ((0, 0), (0, h - v.shape[1]), (0, 0), (0, 0)), constant_values=255)
        parts.append(v)
        if i < len(videos) - 1:
            parts.append(np.full((t, h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=2)


def frame_grid(rows: Sequence[np.ndarray], max_frames: int = 8) -> np.ndarray:
    """One image with a row of evenly spaced frames per (T,H,W,3) video."""
    lines = []
    for video in rows:
        idx = np.linspace(0, video.shape[0] - 1, min(max_frames, video.shape[0])).round().astype(int)
        lines.append(np.concatenate([video[i] for i in idx], axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    return np.concatenate(lines, axis=0)
