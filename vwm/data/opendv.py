"""OpenDV-YouTube subset: 10 fps frame folders in the DriveAGI layout (`%09d.jpg`) and mp4 files (decord).

Clips come from the reference annotation JSON (a list of `{"folder_name": <folder under data_root>,
"first_frame": "<zero-padded index>.<ext>"}`, plus our `{"video": <mp4 under data_root>,
"first_frame": <int>}` for videos) or from scanning `data_root` (a clip starts every `stride` frames of every
run of consecutive frames; every video is probed for its frame count). OpenDV clips carry no actions.
`python -m vwm.data.opendv index --data-root D --out annos/YouTube.json` writes the scan as annotation JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Any, Sequence

import numpy as np

from vwm.cli.common import run_cli
from vwm.data.base import BrokenSampleError, Clip
from vwm.data.video import (
    IMAGE_EXTENSIONS,
    MediaRoot,
    VideoInfo,
    check_target_size,
    decode_video,
    load_image_sequence,
    probe_video,
    read_json_list,
    summarize_rejections,
)
from vwm.defaults import NUM_FRAMES

log = logging.getLogger(__name__)

FRAME_NAME = re.compile(r"^(\d{1,18})\.(" + "|".join(IMAGE_EXTENSIONS) + r")$", re.IGNORECASE)
"""A frame file name: zero-padded index and image extension (DriveAGI writes `%09d.jpg`)."""
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm")
"""Video files the scan and the `video` entries accept."""
OPENDV_FPS = 10.0
"""Frame rate of the DriveAGI frame folders, and the rate videos are sampled at by default."""


class OpenDVSubset:
    """OpenDV-YouTube clips of `num_frames` consecutive frames from frame folders or videos (no actions)."""

    def __init__(self, data_root: str = "data/YouTube",
                 anno_file: str | Sequence[str] | None = "annos/YouTube.json", *, num_frames: int = NUM_FRAMES,
                 target_height: int = 320, target_width: int = 576, stride: int = 1,
                 video_fps: float | None = OPENDV_FPS, jpeg_draft: bool = True, strict: bool = False):
        check_target_size(target_height, target_width)
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride={stride!r} must be a positive integer (frames between clip starts)")
        if video_fps is not None and not video_fps > 0:
            raise ValueError(f"video_fps={video_fps!r} must be positive or null (use every video frame)")
        self.num_frames = num_frames
        self.target_height = target_height
        self.target_width = target_width
        self.stride = stride
        self.video_fps = video_fps
        self.jpeg_draft = jpeg_draft
        self.root = MediaRoot(data_root)
        # Compact index (numpy arrays survive fork-based DataLoader workers without copy-on-write growth):
        # a table of sources (kind, relative path, zero padding, extension) and one (source, start) per clip.
        self._sources: list[tuple[str, str, int, str]] = []
        self._video_info: dict[str, VideoInfo] = {}
        rejected: dict[str, list[str]] = {}
        if anno_file is None:
            src, start = self._scan(rejected)
        else:
            src, start = self._read_annotations(anno_file, rejected)
        self._src = np.asarray(src, dtype=np.int32)
        self._start = np.asarray(start, dtype=np.int64)
        self.n_rejected = sum(len(v) for v in rejected.values())
        where = f"anno_file={anno_file!r}" if anno_file is not None else f"scan of data_root={data_root!r}"
        if rejected:
            message = f"OpenDV {where}: rejected {self.n_rejected} entries: {summarize_rejections(rejected)}"
            if strict:
                raise ValueError(message + " (strict=True)")
            log.warning(message)
        if len(self._src) == 0:
            raise ValueError(f"OpenDV {where} gives no clip of num_frames={num_frames} frames")
        log.info("OpenDV %s: %d clips from %d sources", where, len(self._src), len(self._sources))

    def __len__(self) -> int:
        return len(self._src)

    def _add_source(self, key: tuple[str, str, int, str], table: dict[tuple[str, str, int, str], int]) -> int:
        if key not in table:
            table[key] = len(self._sources)
            self._sources.append(key)
        return table[key]

    def _video_step(self, fps: float) -> int:
        return 1 if self.video_fps is None else max(1, round(fps / self.video_fps))

    def _read_annotations(self, anno_file: str | Sequence[str], rejected: dict[str, list[str]]
                          ) -> tuple[list[int], list[int]]:
        table: dict[tuple[str, str, int, str], int] = {}
        src: list[int] = []
        start: list[int] = []
        exists: dict[str, bool] = {}
        for entry in read_json_list(anno_file):
            key, first, reason = self._parse_entry(entry)
            if reason is None and key[1] not in exists:
                check = os.path.isdir if key[0] == "frames" else os.path.isfile
                exists[key[1]] = check(os.path.join(self.root.root, key[1]))
            if reason is None and not exists[key[1]]:
                reason = "missing folder or video"
            if reason is not None:
                rejected.setdefault(reason, []).append(str(entry))
                continue
            src.append(self._add_source(key, table))
            start.append(first)
        return src, start

    def _parse_entry(self, entry: Any) -> tuple[tuple[str, str, int, str], int, str | None]:
        bad = (("", "", 0, ""), 0)
        if not isinstance(entry, dict):
            return (*bad, "entry is not an object")
        if "folder_name" in entry:
            rel, kind = entry["folder_name"], "frames"
        elif "video" in entry:
            rel, kind = entry["video"], "video"
        else:
            return (*bad, "entry has neither folder_name nor video")
        problem = self.root.path_problem(rel)
        if problem is not None:
            return (*bad, f"path {problem}")
        rel = os.path.normpath(rel)
        first = entry.get("first_frame")
        if kind == "frames":
            match = FRAME_NAME.match(first) if isinstance(first, str) else None
            if match is None:
                return (*bad, "first_frame is not '<digits>.<jpg|jpeg|png>'")
            key: tuple[str, str, int, str] = ("frames", rel, len(match.group(1)), match.group(2))
            start = int(match.group(1))
            parent = rel
        else:
            if not rel.lower().endswith(VIDEO_EXTENSIONS):
                return (*bad, f"video is not one of {', '.join(VIDEO_EXTENSIONS)}")
            if isinstance(first, bool) or not isinstance(first, int) or first < 0:
                return (*bad, "first_frame of a video is not a non-negative integer")
            key, start, parent = ("video", rel, 0, ""), first, os.path.dirname(rel)
        if not self.root.dir_inside(parent):
            return (*bad, "path escapes data_root through a symlink")
        return key, start, None

    def _scan(self, rejected: dict[str, list[str]]) -> tuple[list[int], list[int]]:
        table: dict[tuple[str, str, int, str], int] = {}
        src: list[int] = []
        start: list[int] = []
        span = self.num_frames
        for dirpath, dirnames, filenames in os.walk(self.root.root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root.root)
            runs: dict[tuple[int, str], list[int]] = {}
            for name in sorted(filenames):
                match = FRAME_NAME.match(name)
                if match is not None:
                    runs.setdefault((len(match.group(1)), match.group(2)), []).append(int(match.group(1)))
                elif name.lower().endswith(VIDEO_EXTENSIONS):
                    rel = os.path.normpath(os.path.join(rel_dir, name))
                    try:
                        info = probe_video(os.path.join(self.root.root, rel))
                    except BrokenSampleError as exc:
                        rejected.setdefault("unreadable video", []).append(f"{rel}: {exc.reason}")
                        continue
                    self._video_info[rel] = info
                    step = self._video_step(info.fps)
                    sid = self._add_source(("video", rel, 0, ""), table)
                    for first in range(0, info.num_frames - (span - 1) * step, self.stride * step):
                        src.append(sid)
                        start.append(first)
            for (pad, ext), indices in sorted(runs.items()):
                sid = self._add_source(("frames", os.path.normpath(rel_dir), pad, ext), table)
                for run in _consecutive_runs(sorted(indices)):
                    for first in range(run[0], run[1] - span + 2, self.stride):
                        src.append(sid)
                        start.append(first)
        return src, start

    def load_clip(self, index: int) -> Clip:
        """Decode clip `index` to uint8 (T, 3, H, W) at the target size; BrokenSampleError if unreadable."""
        kind, rel, pad, ext = self._sources[int(self._src[index])]
        first = int(self._start[index])
        if kind == "frames":
            paths = [self.root.open_path(os.path.join(rel, f"{i:0{pad}d}.{ext}"))
                     for i in range(first, first + self.num_frames)]
            frames = load_image_sequence(paths, self.target_height, self.target_width, draft=self.jpeg_draft)
            return Clip(frames=frames, source=paths[0])
        path = self.root.open_path(rel)
        info = self._video_info.get(rel)
        if info is None:
            info = self._video_info[rel] = probe_video(path)
        step = self._video_step(info.fps)
        indices = [first + i * step for i in range(self.num_frames)]
        frames = decode_video(path, indices, info, self.target_height, self.target_width)
        return Clip(frames=frames, source=f"{path}@{first}")


def _consecutive_runs(indices: list[int]) -> list[tuple[int, int]]:
    """Inclusive (first, last) ranges of consecutive integers in a sorted list."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def scan_annotations(data_root: str, *, num_frames: int = NUM_FRAMES, stride: int = 1,
                     video_fps: float | None = OPENDV_FPS) -> list[dict[str, Any]]:
    """Annotation entries (reference schema, plus `video` entries) for every clip found by scanning a tree."""
    subset = OpenDVSubset(data_root, None, num_frames=num_frames, stride=stride, video_fps=video_fps)
    entries: list[dict[str, Any]] = []
    for sid, first in zip(subset._src.tolist(), subset._start.tolist()):
        kind, rel, pad, ext = subset._sources[sid]
        if kind == "frames":
            entries.append({"folder_name": rel, "first_frame": f"{first:0{pad}d}.{ext}"})
        else:
            entries.append({"video": rel, "first_frame": first})
    return entries


def parser(prog: str = "python -m vwm.data.opendv") -> argparse.ArgumentParser:
    """The OpenDV indexer's argument parser (`vwm data opendv index ...`)."""
    p = argparse.ArgumentParser(prog=prog)
    sub = p.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="scan frame folders and videos, write annotation JSON")
    index.add_argument("--data_root", "--data-root", "--dataroot", dest="data_root", required=True)
    index.add_argument("--out", required=True)
    index.add_argument("--num_frames", "--num-frames", dest="num_frames", type=int, default=NUM_FRAMES)
    index.add_argument("--stride", type=int, default=1)
    index.add_argument("--video_fps", "--video-fps", dest="video_fps", type=float, default=OPENDV_FPS)
    index.add_argument("--debug", action="store_true", help="full tracebacks for errors (also VWM_DEBUG=1)")
    return p


def _index(args: argparse.Namespace) -> None:
    entries = scan_annotations(args.data_root, num_frames=args.num_frames, stride=args.stride,
                               video_fps=args.video_fps)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    print(f"wrote {len(entries)} clips to {args.out}")


def main(argv: Sequence[str] | None = None, prog: str = "python -m vwm.data.opendv") -> int:
    """CLI: `python -m vwm.data.opendv index --data_root D --out F` writes the scanned clips as JSON; exit code 2
    with a one-line message for a user error."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(prog, lambda a: _index(parser(prog).parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
