"""OpenDV-YouTube subset: reference JSON, folder scan, mp4 via decord, poisoned annotations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, clean_subprocess_env
from fixtures_data import truncate, write_frame_folder, write_mp4
from vwm.data.opendv import OpenDVSubset

SIZE = {"target_height": 64, "target_width": 128}


def _frame_ids(clip) -> list[int]:
    return [round(f[0].float().mean().item() / 8) for f in clip.frames]


def _write_json(path, entries) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


def test_reference_json_clips(tmp_path):
    root = tmp_path / "YouTube"
    write_frame_folder(str(root), "city/video_a", 30)
    write_frame_folder(str(root), "video_b", 12, start=100, pad=6, ext="png")
    anno = _write_json(tmp_path / "YouTube.json", [
        {"folder_name": "city/video_a", "first_frame": "000000003.jpg"},
        {"folder_name": "video_b", "first_frame": "000100.png"},
    ])
    subset = OpenDVSubset(str(root), anno, num_frames=10, **SIZE)
    assert len(subset) == 2 and subset.n_rejected == 0
    clip = subset.load_clip(0)
    assert clip.frames.shape == (10, 3, 64, 128) and clip.actions == {}
    assert _frame_ids(clip) == list(range(3, 13))
    assert clip.source.endswith(os.path.join("city", "video_a", "000000003.jpg"))
    assert _frame_ids(subset.load_clip(1)) == [(i % 32) for i in range(100, 110)]


def test_scan_finds_runs_with_stride(tmp_path):
    root = tmp_path / "tree"
    write_frame_folder(str(root), "a", 20)                 # frames 0..19
    write_frame_folder(str(root), "a", 9, start=30)        # a gap: 30..38
    write_frame_folder(str(root), "b/c", 7, start=5)       # nested, 5..11
    (root / "b" / "notes.txt").write_text("ignored")
    subset = OpenDVSubset(str(root), None, num_frames=6, stride=4, **SIZE)
    # run 0..19: starts 0,4,8,12 (12+5=17 <= 19; 16+5=21 > 19); run 30..38: 30 (34+5 > 38); run 5..11: 5
    assert len(subset) == 6
    starts = sorted(_frame_ids(subset.load_clip(i))[0] for i in range(len(subset)))
    assert starts == [0, 4, 5, 8, 12, 30]


def test_mp4_from_scan_and_from_json(tmp_path):
    root = tmp_path / "videos"
    write_mp4(str(root / "drive" / "a.mp4"), 30, fps=20)
    truncate(write_mp4(str(root / "drive" / "broken.mp4"), 30), 0.5)
    scanned = OpenDVSubset(str(root), None, num_frames=5, stride=3, video_fps=10.0, **SIZE)
    # 20 fps sampled at 10 fps: step 2, a clip spans 9 source frames; starts every 6 source frames: 0..18
    assert len(scanned) == 4 and scanned.n_rejected == 1
    assert _frame_ids(scanned.load_clip(1)) == [6, 8, 10, 12, 14]
    anno = _write_json(tmp_path / "v.json", [{"video": "drive/a.mp4", "first_frame": 1},
                                            {"video": "drive/broken.mp4", "first_frame": 0}])
    listed = OpenDVSubset(str(root), anno, num_frames=4, video_fps=None, **SIZE)
    assert _frame_ids(listed.load_clip(0)) == [1, 2, 3, 4]
    from vwm.data.base import BrokenSampleError

    with pytest.raises(BrokenSampleError):
        listed.load_clip(1)


def test_poisoned_annotations_are_rejected_and_nothing_outside_is_opened(tmp_path):
    root = tmp_path / "YouTube"
    write_frame_folder(str(root), "good", 8)
    outside = tmp_path / "secret"
    write_frame_folder(str(outside), "", 8)
    os.symlink(outside, root / "escape")
    poisoned = [
        {"folder_name": "../secret", "first_frame": "000000000.jpg"},
        {"folder_name": str(outside), "first_frame": "000000000.jpg"},
        {"folder_name": "escape", "first_frame": "000000000.jpg"},
        {"folder_name": "go\x00od", "first_frame": "000000000.jpg"},
        {"folder_name": "g" * 10_000, "first_frame": "000000000.jpg"},
        {"folder_name": "good", "first_frame": "abc.jpg"},
        {"folder_name": "good", "first_frame": "0.0.jpg"},
        {"folder_name": "missing", "first_frame": "000000000.jpg"},
        {"video": "../x.mp4", "first_frame": 0},
        {"first_frame": "000000000.jpg"},
        "not an object",
    ]
    valid = [{"folder_name": "good", "first_frame": "000000000.jpg"},
             {"folder_name": "good", "first_frame": "000000002.jpg"}]
    anno = _write_json(tmp_path / "anno.json", poisoned + valid)
    opened: list[str] = []
    audit = {"on": True}

    def hook(event, args):
        if audit["on"] and event == "open" and isinstance(args[0], str):
            opened.append(os.path.realpath(args[0]))

    sys.addaudithook(hook)
    try:
        subset = OpenDVSubset(str(root), anno, num_frames=5, **SIZE)
        clips = [subset.load_clip(i) for i in range(len(subset))]
    finally:
        audit["on"] = False
    assert subset.n_rejected == len(poisoned) and len(subset) == len(valid)
    assert [_frame_ids(c)[0] for c in clips] == [0, 2]
    real_root = os.path.realpath(root)
    outside_opens = [p for p in opened
                     if not p.startswith(real_root + os.sep) and p != os.path.realpath(anno)]
    assert outside_opens == []
    with pytest.raises(ValueError, match=r"rejected 11 entries: .*strict=True"):
        OpenDVSubset(str(root), anno, num_frames=5, strict=True, **SIZE)


def test_setup_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root='.*nowhere' is not an existing directory"):
        OpenDVSubset(str(tmp_path / "nowhere"), None, **SIZE)
    (tmp_path / "root").mkdir()
    with pytest.raises(FileNotFoundError, match="anno_file='.*none.json' is not an existing file"):
        OpenDVSubset(str(tmp_path / "root"), str(tmp_path / "none.json"), **SIZE)
    with pytest.raises(ValueError, match="gives no clip of num_frames=25"):
        OpenDVSubset(str(tmp_path / "root"), None, **SIZE)
    with pytest.raises(ValueError, match="stride=0 must be a positive integer"):
        OpenDVSubset(str(tmp_path / "root"), None, stride=0, **SIZE)


def test_index_cli_writes_reference_json(tmp_path):
    root = tmp_path / "YouTube"
    write_frame_folder(str(root), "a", 12)
    write_mp4(str(root / "b.mp4"), 12)
    out = tmp_path / "annos" / "YouTube.json"
    result = subprocess.run([sys.executable, "-m", "vwm.data.opendv", "index", "--data-root", str(root),
                             "--out", str(out), "--num-frames", "10"], cwd=REPO_ROOT,
                            env=clean_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    entries = json.loads(out.read_text())
    assert {"folder_name": "a", "first_frame": "000000002.jpg"} in entries
    assert {"video": "b.mp4", "first_frame": 2} in entries and len(entries) == 6
    assert len(OpenDVSubset(str(root), str(out), num_frames=10, **SIZE)) == 6
