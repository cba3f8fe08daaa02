"""Procedural driving world: determinism, shapes, nuScenes-schema annotations, writer, lateral motion."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, clean_subprocess_env
from vwm.actions import ACTION_FEATURES, ACTION_KEYS, COMMANDS, STEERING_WHEEL_RANGE_DEG, key_frame_indices
from vwm.data.base import Clip
from vwm.data.toyworld import CAMERA, ToyWorldSubset, lateral_motion, main, render_rollout, steering_plan
from vwm.data.toyworld_scene import STEERING_RATIO


def _straight_road_indices(subset: ToyWorldSubset, count: int) -> list[int]:
    """Clips whose policy barely steers, i.e. that start on a straight stretch of road."""
    found = [i for i in range(80) if max(abs(a) for a in subset.annotation(i)["angle"]) < 15.0]
    assert len(found) >= count, found
    return found[:count]


def test_same_seed_and_index_are_identical_and_others_differ():
    a, b = ToyWorldSubset(8, 64, 64, seed=3), ToyWorldSubset(8, 64, 64, seed=3)
    clip_a, clip_b = a.load_clip(5), b.load_clip(5)
    assert torch.equal(clip_a.frames, clip_b.frames)
    assert clip_a.actions.keys() == clip_b.actions.keys()
    assert all(torch.equal(clip_a.actions[k], clip_b.actions[k]) for k in clip_a.actions)
    assert a.annotation(5) == b.annotation(5)
    assert not torch.equal(clip_a.frames, a.load_clip(6).frames)
    assert a.annotation(5) != a.annotation(6)
    assert not torch.equal(clip_a.frames, ToyWorldSubset(8, 64, 64, seed=4).load_clip(5).frames)


@pytest.mark.parametrize("num_frames,height,width", [(8, 64, 64), (25, 320, 576)])
def test_clip_shapes_dtypes_and_action_contract(num_frames, height, width):
    subset = ToyWorldSubset(num_frames, height, width, length=50)
    assert len(subset) == 50
    clip = subset.load_clip(1)
    assert isinstance(clip, Clip)
    assert clip.frames.shape == (num_frames, 3, height, width) and clip.frames.dtype == torch.uint8
    assert clip.frames.float().std() > 20  # not a blank image
    assert {"command", "trajectory", "speed", "angle"} <= set(clip.actions) <= set(ACTION_KEYS)
    for key, value in clip.actions.items():
        assert value.shape == (ACTION_FEATURES[key],) and value.dtype == torch.float32
    assert "seed=0" in clip.source and "index=1" in clip.source


def test_actions_are_the_nuscenes_normalisation_of_the_annotation():
    subset = ToyWorldSubset(25, 64, 64)
    seen_goal = seen_no_goal = False
    for index in range(12):
        anno, actions = subset.annotation(index), subset.load_clip(index).actions
        assert len(anno["traj"]) == 10 and len(anno["speed"]) == 5 and len(anno["angle"]) == 5
        assert anno["traj"][:2] == [0.0, 0.0]
        assert anno["frames"] == [f"frames/seed0_{index:07d}/{i:09d}.jpg" for i in range(25)]
        assert actions["command"].tolist() == [float(anno["cmd"])]
        assert actions["trajectory"].tolist() == pytest.approx(anno["traj"][2:], abs=1e-5)
        assert actions["speed"].tolist() == pytest.approx(anno["speed"][1:], abs=1e-5)
        assert actions["angle"].tolist() == pytest.approx([a / 780.0 for a in anno["angle"][1:]], abs=1e-6)
        u, v = anno["goal"]
        valid = anno["z"] > 0 and 0 < u < 1600 and 0 < v < 900
        assert ("goal" in actions) == valid
        if valid:
            assert actions["goal"].tolist() == pytest.approx([u / 1600, v / 900], abs=1e-6)
        seen_goal, seen_no_goal = seen_goal or valid, seen_no_goal or not valid
    assert seen_goal and seen_no_goal


def test_straight_constant_speed_trajectory_and_goal_projection():
    subset = ToyWorldSubset(25, 64, 64)
    clip = subset.rollout(2, [8.0] * 25, [0.0] * 25)
    times = [k / 10.0 for k in key_frame_indices(25)][1:]
    expected = [c for t in times for c in (8.0 * t, 0.0)]
    assert clip.actions["trajectory"].tolist() == pytest.approx(expected, abs=1e-3)
    assert clip.actions["command"].item() == COMMANDS["straight"]
    assert clip.actions["speed"].tolist() == pytest.approx([8.0 * 3.6] * 4)  # km/h
    assert clip.actions["angle"].tolist() == [0.0] * 4
    # Final position (19.2, 0) on the ground seen by a pinhole 1.5 m high and 1.7 m ahead of the origin.
    depth = 19.2 - CAMERA.forward
    u, v = CAMERA.cx, CAMERA.cy + CAMERA.focal * CAMERA.height / depth
    assert clip.actions["goal"].tolist() == pytest.approx([u / 1600, v / 900], abs=1e-4)


def test_steering_left_turns_left_and_right_turns_right():
    subset = ToyWorldSubset(25, 64, 64)
    left = subset.rollout(2, [8.0] * 25, [120.0] * 25).actions
    right = subset.rollout(2, [8.0] * 25, [-120.0] * 25).actions
    lateral_left, lateral_right = left["trajectory"][1::2], right["trajectory"][1::2]
    assert torch.all(torch.diff(lateral_left) > 0) and lateral_left[-1] > 2.0
    assert torch.allclose(lateral_right, -lateral_left, atol=1e-3)
    assert left["command"].item() == COMMANDS["left"] and right["command"].item() == COMMANDS["right"]
    assert left["angle"].tolist() == pytest.approx([120.0 / STEERING_WHEEL_RANGE_DEG] * 4)
    # Bicycle model: heading rate v tan(delta) / L, so the final point lies on that circle.
    radius = 2.7 / math.tan(math.radians(120.0 / STEERING_RATIO))
    x, y = left["trajectory"][-2].item(), left["trajectory"][-1].item()
    assert math.hypot(x, y - radius) == pytest.approx(radius, abs=1e-3)
    assert left["goal"][0] < 0.5 < right["goal"][0]  # the goal lies left of the image centre


def test_stopped_clip_is_stop_with_goal_behind_camera():
    subset = ToyWorldSubset(25, 64, 64)
    clip = subset.rollout(3, [0.0] * 25, [0.0] * 25)
    assert clip.actions["command"].item() == COMMANDS["stop"]
    assert "goal" not in clip.actions  # the final position is the ego origin, 1.7 m behind the camera
    stops = [i for i in range(60) if subset.annotation(i)["cmd"] == COMMANDS["stop"]]
    assert stops
    anno = subset.annotation(stops[0])
    assert math.hypot(anno["traj"][-2], anno["traj"][-1]) < 1.0


@pytest.mark.parametrize("num_frames", [25, 8])
def test_driver_policy_covers_all_commands(num_frames):
    subset = ToyWorldSubset(num_frames, 64, 64)
    counts = collections.Counter(subset.annotation(i)["cmd"] for i in range(200))
    assert set(counts) == set(COMMANDS.values())
    assert min(counts.values()) >= 14, counts  # each command in at least 7 % of the clips


def test_writer_output_loads_and_matches_annotations(tmp_path):
    out = str(tmp_path / "toy")
    argv = ["write", "--out", out, "--num-clips", "3", "--num-frames", "6", "--height", "64", "--width", "96",
            "--seed", "1"]
    assert main(argv) == 0
    subset = ToyWorldSubset(6, 64, 96, seed=1)
    with open(os.path.join(out, "annos", "nuscenes.json")) as fh:
        nuscenes = json.load(fh)
    with open(os.path.join(out, "annos", "opendv.json")) as fh:
        opendv = json.load(fh)
    assert nuscenes == [subset.annotation(i) for i in range(3)]
    assert opendv == [{"folder_name": subset.folder_name(i), "first_frame": "000000000.jpg"}
                      for i in range(3)]
    for index, (anno, entry) in enumerate(zip(nuscenes, opendv)):
        frames = subset.load_clip(index).frames
        names = sorted(os.listdir(os.path.join(out, entry["folder_name"])))
        assert names == [f"{i:09d}.jpg" for i in range(6)]
        for i, rel in enumerate(anno["frames"]):
            assert rel == f"{entry['folder_name']}/{names[i]}"
            with Image.open(os.path.join(out, rel)) as img:
                assert img.format == "JPEG" and img.size == (96, 64)
                pixels = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float()
            assert (pixels - frames[i].float()).abs().mean() < 3.0


def test_writer_cli_runs_as_module(tmp_path):
    out = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "vwm.data.toyworld", "write", "--out", out, "--num-clips", "1",
           "--num-frames", "5", "--height", "32", "--width", "32"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 clips" in result.stdout
    assert os.path.isfile(os.path.join(out, "frames", "seed0_0000000", "000000004.jpg"))


@pytest.mark.parametrize("num_frames,height,width", [(8, 64, 64), (25, 128, 224)])
def test_lateral_motion_sign_follows_steering(num_frames, height, width):
    subset = ToyWorldSubset(num_frames, height, width)
    for index in _straight_road_indices(subset, 3):
        speeds = [8.0] * num_frames
        left = lateral_motion(subset.rollout(index, speeds, [120.0] * num_frames).frames)
        right = lateral_motion(subset.rollout(index, speeds, [-120.0] * num_frames).frames)
        straight = lateral_motion(subset.rollout(index, speeds, [0.0] * num_frames).frames)
        assert left > 0.02 and right < -0.02, (index, left, right)
        assert abs(straight) < 0.2 * min(left, -right), (index, straight, left, right)


def test_lateral_motion_on_blurry_float_frames():
    clip = render_rollout([8.0] * 8, [120.0] * 8, seed=0, height=64, width=64, start_index=2)
    frames = clip.frames.float() / 127.5 - 1.0
    blurry = torch.nn.functional.avg_pool2d(frames, 5, stride=1, padding=2, count_include_pad=False)
    blurry = blurry + 0.05 * torch.randn(blurry.shape, generator=torch.Generator().manual_seed(0))
    assert lateral_motion(frames) == pytest.approx(lateral_motion(clip.frames), abs=1e-6)
    assert lateral_motion(blurry) > 0.5 * lateral_motion(frames) > 0
    assert lateral_motion(blurry.flip(-1)) < 0  # a mirrored clip turns the other way


def test_render_rollout_starts_from_the_subset_clip_first_frame():
    subset = ToyWorldSubset(8, 64, 64, seed=2)
    clip = render_rollout([5.0] * 8, [200.0] * 8, seed=2, height=64, width=64, start_index=4)
    assert torch.equal(clip.frames[0], subset.load_clip(4).frames[0])
    assert not torch.equal(clip.frames[-1], subset.load_clip(4).frames[-1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fps": 0.0}, "fps=0.0"),
        ({"speed_unit": "mph"}, "speed_unit='mph'"),
        ({"num_lanes": 0}, "num_lanes=0"),
        ({"length": 0}, "length=0"),
    ],
)
def test_invalid_parameters_name_field_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyWorldSubset(8, 64, 64, **kwargs)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="num_frames=3"):
        ToyWorldSubset(3, 64, 64)
    subset = ToyWorldSubset(8, 64, 64, length=5)
    with pytest.raises(IndexError, match=r"index=5 out of range \[0, 5\)"):
        subset.load_clip(5)
    with pytest.raises(ValueError, match="same length"):
        subset.rollout(0, [1.0] * 8, [0.0] * 7)
    with pytest.raises(ValueError, match=r"steering=.*\[-780, 780\]"):
        subset.rollout(0, [1.0] * 8, [900.0] * 8)
    with pytest.raises(ValueError, match="lateral_motion"):
        lateral_motion(torch.zeros(1, 3, 16, 16))


def test_speed_unit_kmh_scales_speed_only():
    mps = ToyWorldSubset(8, 64, 64, speed_unit="m/s").annotation(1)
    kmh = ToyWorldSubset(8, 64, 64).annotation(1)  # km/h is the default, as nuScenes' CAN speed
    assert kmh["speed"] == pytest.approx([3.6 * s for s in mps["speed"]], abs=1e-3)
    assert {k: v for k, v in kmh.items() if k != "speed"} == {k: v for k, v in mps.items() if k != "speed"}


def test_explore_policy_steering_maps_to_view_motion_and_is_deterministic():
    subset = ToyWorldSubset(8, 64, 64, policy="explore")
    a, b = subset.load_clip(3), subset.load_clip(3)
    assert torch.equal(a.frames, b.frames) and a.actions.keys() == b.actions.keys()
    agree = total = 0
    for index in range(40):
        _, steer = subset.explore_actions(index)
        if abs(steer.mean()) < 100:
            continue
        clip = subset.load_clip(index)
        assert clip.actions["angle"].mean().item() * steer.mean() > 0  # the annotation follows the steering
        agree += (lateral_motion(clip.frames) > 0) == (steer.mean() > 0)
        total += 1
    assert total >= 10 and agree / total >= 0.8
    with pytest.raises(ValueError, match="policy='wander'"):
        ToyWorldSubset(8, 64, 64, policy="wander")


def test_steering_plan_is_a_valid_action_json_with_the_commanded_direction():
    from vwm.sampling.actions import normalise_actions

    left = steering_plan(8.0, 120.0, seed=1, height=64, width=64, num_frames=8, start_index=2)
    right = steering_plan(8.0, -120.0, seed=1, height=64, width=64, num_frames=8, start_index=2)
    assert left["angle"] == pytest.approx([120.0] * 4) and right["angle"] == pytest.approx([-120.0] * 4)
    assert left["command"] in (1, 3) and right["command"] in (0, 3)  # left or straight; right or straight
    assert left["trajectory"][-1] > 0 > right["trajectory"][-1]  # final lateral offset y: positive = left
    for plan in (left, right):
        features = normalise_actions(plan)
        assert set(features) >= {"command", "trajectory", "speed", "angle"}
        assert features["speed"].tolist() == pytest.approx([8.0 * 3.6] * 4)  # km/h, as the annotations
