"""Frame decoding for the data pipeline: media paths confined to a data root, JPEG/PNG decoding (with a
reduced-size JPEG draft when the target is much smaller than the source), mp4 decoding with decord (resized
while decoding), the reference's centre-crop to the target aspect and Lanczos resize. Frames leave here as
uint8 (T, 3, H, W); `to_unit_range` maps them to [-1, 1] exactly as the reference's `ToTensor()*2-1`."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from vwm.data.base import BrokenSampleError

MAX_IMAGE_PIXELS = 89_478_485
"""Largest image we decode (Pillow's default bomb limit), checked on the header ourselves because importing
nuscenes-devkit raises Pillow's global `Image.MAX_IMAGE_PIXELS` for its map masks."""
IMAGE_FORMATS = ("JPEG", "PNG")
"""Formats PIL may identify a frame file as; anything else is a broken sample."""
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
)
"""What PIL raises on corrupt, truncated, missing or unidentifiable image files."""
MAX_PATH_CHARS = 4096
"""Longest relative media path accepted from an annotation file."""
MAX_DRAFT_REDUCTION = 4
"""Largest JPEG DCT-domain reduction used (1/8 keeps only each block's DC term and aliases visibly)."""
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
"""Frame file extensions the frame-folder layouts may use."""


def check_target_size(target_height: int, target_width: int) -> None:
    """Raise ValueError unless the target size is positive multiples of 64 (the VAE and UNet need it)."""
    for name, value in (("target_height", target_height), ("target_width", target_width)):
        if not isinstance(value, int) or value <= 0 or value % 64:
            raise ValueError(f"{name}={value!r} must be a positive multiple of 64")


def crop_box(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int, int, int]:
    """Centre crop (left, top, right, bottom) of a width x height image to the target aspect (reference)."""
    if width / height > target_width / target_height:
        crop_w = int(target_width / target_height * height)
        return (width - crop_w) // 2, 0, (width + crop_w) // 2, height
    if width / height < target_width / target_height:
        crop_h = int(target_height / target_width * width)
        return 0, (height - crop_h) // 2, width, (height + crop_h) // 2
    return 0, 0, width, height


def _resize_rgb(image: Image.Image, box: tuple[float, float, float, float],
                size: tuple[int, int]) -> np.ndarray:
    # Integer boxes crop then resize, which is bit-identical to the reference; fractional boxes (a drafted
    # JPEG, a frame decoded at reduced size) resample the box directly.
    if image.mode != "RGB":
        image = image.convert("RGB")
    if all(float(v).is_integer() for v in box):
        image = image.crop(tuple(int(v) for v in box))
        box_arg = None
    else:
        box_arg = box
    return np.asarray(image.resize(size, resample=Image.LANCZOS, box=box_arg))


def decode_image(path: str, target_height: int, target_width: int, *, draft: bool = True) -> np.ndarray:
    """Decode one JPEG/PNG frame, centre-crop it to the target aspect and Lanczos-resize it: uint8 (H, W, 3).

    With `draft`, a JPEG at least twice the target size is decoded at the largest DCT scale (1/2 or 1/4) whose
    crop still covers the target, then Lanczos-resized: 44-50 dB PSNR against the full decode for 1600x900 ->
    576x320, about twice as fast. Raises BrokenSampleError for any unreadable or oversized file."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BrokenSampleError(path, f"{width}x{height} image exceeds {MAX_IMAGE_PIXELS} pixels "
                                              "(decompression bomb)")
            box: tuple[float, float, float, float] = crop_box(width, height, target_width, target_height)
            if draft and image.format == "JPEG":
                crop_w, crop_h = box[2] - box[0], box[3] - box[1]
                least = math.ceil(width / MAX_DRAFT_REDUCTION), math.ceil(height / MAX_DRAFT_REDUCTION)
                request = (max(math.ceil(width * target_width / crop_w), least[0]),
                           max(math.ceil(height * target_height / crop_h), least[1]))
                image.draft("RGB", request)
                scale_x, scale_y = image.size[0] / width, image.size[1] / height
                if image.size != (width, height):
                    box = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
            image.load()
            return _resize_rgb(image, box, (target_width, target_height))
    except IMAGE_ERRORS as exc:
        raise BrokenSampleError(path, f"{type(exc).__name__}: {exc}") from exc


def load_image_sequence(paths: Sequence[str], target_height: int, target_width: int, *,
                        draft: bool = True) -> torch.Tensor:
    """Decode a list of frame files into uint8 (T, 3, H, W) at the target size."""
    frames = np.stack([decode_image(p, target_height, target_width, draft=draft) for p in paths])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float32 in [-1, 1] with the reference's arithmetic (x / 255 * 2 - 1)."""
    if frames.dtype != torch.uint8:
        raise ValueError(f"to_unit_range expects uint8 frames, got {frames.dtype}")
    return frames.to(torch.float32).div_(255.0).mul_(2.0).sub_(1.0)


@dataclass(frozen=True)
class VideoInfo:
    """Header facts of a video file."""

    num_frames: int
    fps: float
    width: int
    height: int


def _decord() -> Any:
    import decord  # imported lazily: workers that only read JPEG frames never load it

    return decord


def _video_errors() -> tuple[type[BaseException], ...]:
    return (_decord().DECORDError, RuntimeError, OSError, ValueError, IndexError)


def probe_video(path: str) -> VideoInfo:
    """Frame count, average fps and frame size of a video; BrokenSampleError if decord cannot open it."""
    decord = _decord()
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        num_frames = len(reader)
        if num_frames == 0:
            raise BrokenSampleError(path, "video has no frames")
        height, width = reader[0].shape[:2]
        return VideoInfo(num_frames, float(reader.get_avg_fps()), int(width), int(height))
    except _video_errors() as exc:
        raise BrokenSampleError(path, f"{type(exc).__name__}: {exc}") from exc


def decode_video(path: str, indices: Sequence[int], info: VideoInfo, target_height: int,
                 target_width: int) -> torch.Tensor:
    """Decode frame indices of a video (frame-accurate seek), resized while decoding to the smallest size
    whose centre crop still covers the target, then crop + Lanczos: uint8 (T, 3, H, W)."""
    decord = _decord()
    if max(indices) >= info.num_frames:
        raise BrokenSampleError(path, f"frame {max(indices)} requested from a {info.num_frames}-frame video")
    left, top, right, bottom = crop_box(info.width, info.height, target_width, target_height)
    scale = min(1.0, max(target_width / (right - left), target_height / (bottom - top)))
    size = (info.width, info.height) if scale == 1.0 else (
        2 * math.ceil(info.width * scale / 2), 2 * math.ceil(info.height * scale / 2))
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=size[0], height=size[1], num_threads=1)
        batch = reader.get_batch(list(indices)).asnumpy()
    except _video_errors() as exc:
        raise BrokenSampleError(path, f"{type(exc).__name__}: {exc}") from exc
    sx, sy = batch.shape[2] / info.width, batch.shape[1] / info.height
    box = (left * sx, top * sy, right * sx, bottom * sy)
    frames = np.stack([_resize_rgb(Image.fromarray(f), box, (target_width, target_height)) for f in batch])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


class MediaRoot:
    """A data root that annotation paths must stay inside (relative, no `..`, no symlink leading out)."""

    def __init__(self, root: str, field: str = "data_root"):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{field}={root!r} is not an existing directory")
        self.root = os.path.abspath(root)
        self.real = os.path.realpath(root)
        self._dir_ok: dict[str, bool] = {}

    def path_problem(self, rel: object) -> str | None:
        """Why `rel` is not an acceptable relative media path (None when it is), without touching the disk."""
        if not isinstance(rel, str) or not rel:
            return "not a non-empty string"
        if "\x00" in rel:
            return "contains a NUL byte"
        if len(rel) > MAX_PATH_CHARS:
            return f"longer than {MAX_PATH_CHARS} characters"
        if os.path.isabs(rel) or rel.startswith("~"):
            return "absolute path"
        if ".." in rel.replace("\\", "/").split("/"):
            return "contains '..'"
        return None

    def inside(self, real: str) -> bool:
        """Whether a resolved path lies inside the data root."""
        return real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)

    def dir_inside(self, rel_dir: str) -> bool:
        """Whether a relative directory resolves (symlinks followed) inside the root; cached per directory."""
        ok = self._dir_ok.get(rel_dir)
        if ok is None:
            ok = self.inside(os.path.realpath(os.path.join(self.root, rel_dir)))
            self._dir_ok[rel_dir] = ok
        return ok

    def open_path(self, rel: str) -> str:
        """Absolute path of a validated relative path, refusing files that are symlinks out of the root."""
        path = os.path.join(self.root, rel)
        if os.path.islink(path) and not self.inside(os.path.realpath(path)):
            raise BrokenSampleError(path, "symlink escapes the data root")
        return path


def read_json_list(anno_file: str | Sequence[str], field: str = "anno_file") -> list[Any]:
    """Concatenate the JSON lists in one annotation file or a list of them; FileNotFoundError / ValueError
    name the file."""
    files = [anno_file] if isinstance(anno_file, str) else list(anno_file)
    if not files:
        raise ValueError(f"{field} is an empty list; give one or more annotation JSON files")
    items: list[Any] = []
    for path in files:
        if not isinstance(path, str) or not os.path.isfile(path):
            raise FileNotFoundError(f"{field}={path!r} is not an existing file")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{field}={path!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, list):
            raise ValueError(f"{field}={path!r} must hold a JSON list of objects, got {type(data).__name__}")
        items.extend(data)
    return items


def summarize_rejections(rejected: dict[str, list[str]], limit: int = 3) -> str:
    """One line: count per rejection reason with a few examples."""
    parts = [f"{len(v)} {reason} (e.g. {', '.join(repr(x)[:120] for x in v[:limit])})"
             for reason, v in sorted(rejected.items())]
    return "; ".join(parts)
