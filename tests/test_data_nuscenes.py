"""nuScenes annotation builder (numerically, on a generated dataset) and the annotation reader."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, clean_subprocess_env
from fixtures_data import CAM_INTRINSIC, CAM_TRANSLATION, NUSCENES_SCENES, T0, frame_time, nuscenes_entry, \
    write_nuscenes
from vwm.data.nuscenes import NuScenesSubset
from vwm.data.nuscenes import main as nuscenes_main

SIZE = {"target_height": 64, "target_width": 128}


def _run_builder(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vwm.data.nuscenes", "build", *args], cwd=REPO_ROOT,
                          env=clean_subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The generated dataset and the builder's annotations for it (CLI run once per module)."""
    root = tmp_path_factory.mktemp("nuscenes")
    write_nuscenes(str(root))
    out = root / "annos" / "nuScenes.json"
    result = _run_builder("--dataroot", str(root), "--version", "v1.0-mini", "--split", "mini_train",
                          "--out", str(out))
    assert result.returncode == 0, result.stderr
    return root, json.loads(out.read_text()), json.loads(result.stdout.strip().splitlines()[-1]), str(out)


def _expected(spec, first_sample: int) -> dict:
    """Annotation values implied by the fixture's poses, camera and CAN definitions (plain trigonometry)."""
    times = [(frame_time(6 * (first_sample + k)) - T0) / 1e6 for k in range(5)]
    x0, y0, yaw0 = spec.pose(times[0])
    traj = []
    for t in times:
        x, y, _ = spec.pose(t)
        dx, dy = x - x0, y - y0
        traj += [math.cos(yaw0) * dx + math.sin(yaw0) * dy, -math.sin(yaw0) * dx + math.cos(yaw0) * dy]
    fx, cx, fy, cy = CAM_INTRINSIC[0][0], CAM_INTRINSIC[0][2], CAM_INTRINSIC[1][1], CAM_INTRINSIC[1][2]
    cam_x, cam_y, cam_z = -(traj[-1] - CAM_TRANSLATION[1]), CAM_TRANSLATION[2], traj[-2] - CAM_TRANSLATION[0]
    goal = [fx * cam_x / cam_z + cx, fy * cam_y / cam_z + cy] if cam_z > 0 else [-1.0, -1.0]
    can = [spec.can_value(t) for t in times] if spec.can is not None else []
    return {"traj": traj, "z": cam_z, "goal": goal, "speed": [c[0] for c in can],
            "angle": [c[1] for c in can]}


def test_builder_values_match_the_fixture_geometry(built):
    root, entries, stats, _ = built
    assert stats["clips"] == 12 and stats["scenes"] == 4 and stats["scenes_without_can"] == 1
    assert stats["key_frames_off_grid"] == 0
    commands = {"scene-0061": 3, "scene-0553": 1, "scene-0655": 0, "scene-0757": 2}
    for s, spec in enumerate(NUSCENES_SCENES):
        for first in range(3):
            entry = entries[3 * s + first]
            want = _expected(spec, first)
            assert len(entry["frames"]) == 25
            assert entry["frames"][0].startswith("samples/CAM_FRONT/")
            assert entry["frames"][1].startswith("sweeps/") and entry["frames"][6].startswith("samples/")
            assert str(frame_time(6 * first + 24)) in entry["frames"][24]
            assert entry["traj"] == pytest.approx(want["traj"], abs=1e-6)
            assert entry["cmd"] == commands[spec.name]
            assert entry["z"] == pytest.approx(want["z"], abs=1e-6)
            assert entry["goal"] == pytest.approx(want["goal"], abs=1e-5)
            assert entry["speed"] == pytest.approx(want["speed"], abs=1e-6)
            assert entry["angle"] == pytest.approx(want["angle"], abs=1e-6)
    assert entries[0]["traj"][:4] == pytest.approx([0.0, 0.0, 2.5, 0.0], abs=1e-9)  # 5 m/s straight ahead
    assert entries[-1]["z"] < 0 and entries[-1]["goal"] == [-1.0, -1.0]  # standing still: goal behind camera


def test_builder_errors(built, tmp_path, capsys):
    root = built[0]
    result = _run_builder("--dataroot", str(root), "--version", "v1.0-mini", "--split", "mini_val",
                          "--out", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "--split='mini_val' has no scene in 'v1.0-mini'" in result.stderr
    assert "Traceback" not in result.stderr  # one line; --debug or VWM_DEBUG=1 shows the traceback
    assert nuscenes_main(["build", "--data_root", str(root), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "has no table folder 'v1.0-trainval'; present: v1.0-mini (pass --version v1.0-mini)" in err
    assert err.startswith("python -m vwm.data.nuscenes: error: ") and len(err.strip().splitlines()) == 1
    assert nuscenes_main(["build", "--data_root", str(root), "--version", "v1.0-mini", "--can_bus_root",
                          str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "has no can_bus/ folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="has no table folder"):
        nuscenes_main(["build", "--data_root", str(root), "--out", str(tmp_path / "x.json"), "--debug"])


def test_reader_normalises_the_built_annotations(built):
    root, entries, _, anno = built
    subset = NuScenesSubset(str(root), anno, num_frames=25, turn_repeat=1, complete_repeat=1, **SIZE)
    assert len(subset) == 12 and subset.n_rejected == 0
    clip = subset.load_clip(1)  # straight scene, second key frame
    entry = entries[1]
    assert clip.frames.shape == (25, 3, 64, 128) and clip.frames.dtype == torch.uint8
    assert [round(f[0].float().mean().item() / 8) for f in clip.frames[:3]] == [6, 7, 8]
    assert set(clip.actions) == {"command", "trajectory", "speed", "angle", "goal"}
    torch.testing.assert_close(clip.actions["trajectory"], torch.tensor(entry["traj"][2:]))
    torch.testing.assert_close(clip.actions["command"], torch.tensor([3.0]))
    torch.testing.assert_close(clip.actions["speed"], torch.tensor(entry["speed"][1:]))
    torch.testing.assert_close(clip.actions["angle"], torch.tensor(entry["angle"][1:]) / 780)
    goal = torch.tensor([entry["goal"][0] / 1600, entry["goal"][1] / 900])
    torch.testing.assert_close(clip.actions["goal"], goal)
    assert all(v.dtype == torch.float32 for v in clip.actions.values())
    assert set(subset.load_clip(7).actions) == {"command", "trajectory", "goal"}  # no CAN data in scene-0655
    assert set(subset.load_clip(10).actions) == {"command", "trajectory", "speed", "angle"}  # goal behind


@pytest.mark.parametrize("turn, complete, size", [(1, 1, 12), (5, 1, 36), (1, 2, 18), (5, 2, 54)])
def test_rebalancing_switches(built, turn, complete, size):
    root, _, _, anno = built
    # 6 turning clips (left with CAN + goal, right without CAN), 6 complete clips (straight + left).
    assert len(NuScenesSubset(str(root), anno, turn_repeat=turn, complete_repeat=complete, **SIZE)) == size


def test_reader_validity_rules_and_rejections(tmp_path):
    root = tmp_path / "nuscenes"
    frames_dir = root / "samples" / "CAM_FRONT"
    frames_dir.mkdir(parents=True)
    frames = [f"samples/CAM_FRONT/{i}.jpg" for i in range(5)]
    valid = [
        nuscenes_entry(frames),
        nuscenes_entry(frames, goal=(0.0, 450.0)),        # u on the border: goal invalid
        nuscenes_entry(frames, goal=(800.0, 900.0)),      # v on the border
        nuscenes_entry(frames, z=0.0),                    # on the camera plane
        nuscenes_entry(frames, speed=[], angle=[]),       # scene without CAN data
    ]
    bad = [
        {**nuscenes_entry(frames), "traj": [0.0] * 9},
        {**nuscenes_entry(frames), "cmd": 7},
        {**nuscenes_entry(frames), "cmd": True},
        {**nuscenes_entry(frames), "speed": [1.0, 2.0, 3.0]},
        {**nuscenes_entry(frames), "goal": [1.0, float("nan")]},
        nuscenes_entry(frames[:4]),
        nuscenes_entry(["../outside.jpg"] + frames[1:]),
        nuscenes_entry(["/etc/passwd"] + frames[1:]),
        [1, 2],
    ]
    anno = tmp_path / "anno.json"
    anno.write_text(json.dumps(valid + bad))
    subset = NuScenesSubset(str(root), str(anno), num_frames=5, turn_repeat=1, complete_repeat=1, **SIZE)
    assert len(subset) == len(valid) and subset.n_rejected == len(bad)
    has_goal = [bool(subset._mask[i, 4]) for i in range(len(valid))]
    assert has_goal == [True, False, False, False, True]
    assert subset._mask[4, 2:4].tolist() == [False, False]
    assert subset._values[0, 9:13].tolist() == pytest.approx([2.0, 3.0, 4.0, 5.0])   # speed[1:]
    assert subset._values[0, 13:17].tolist() == pytest.approx([0.2, 0.3, 0.4, 0.5])  # angle[1:] / 780
    with pytest.raises(ValueError, match="strict=True"):
        NuScenesSubset(str(root), str(anno), num_frames=5, strict=True, **SIZE)
    with pytest.raises(ValueError, match="turn_repeat=0 must be an integer >= 1"):
        NuScenesSubset(str(root), str(anno), num_frames=5, turn_repeat=0, **SIZE)
