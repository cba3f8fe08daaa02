"""nuScenes subset: the reference's annotation JSON (`annos/nuScenes.json` schema) read into clips with all
available actions, and `python -m vwm.data.nuscenes build ...`, which writes that JSON from raw nuScenes with
nuscenes-devkit and its CAN bus expansion. Definitions of every field: docs/data.md."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import sys
from typing import Any, Sequence

import numpy as np
import torch

from vwm.actions import (
    ACTION_FEATURES,
    ACTION_KEYS,
    COMMANDS,
    GOAL_IMAGE_SIZE,
    STEERING_WHEEL_RANGE_DEG,
    command_from_endpoint,
    key_frame_indices,
)
from vwm.cli.common import run_cli
from vwm.data.base import Clip
from vwm.data.video import MediaRoot, check_target_size, load_image_sequence, read_json_list, summarize_rejections
from vwm.defaults import NUM_FRAMES

log = logging.getLogger(__name__)

NUM_KEY_FRAMES = 5
"""Key frames per clip carrying annotations: the current one and the next four (2 Hz, so 2 s ahead)."""
TURN_COMMANDS = (COMMANDS["right"], COMMANDS["left"])
"""Commands the reference's `balance_with_actions` over-samples."""
_OFFSETS = np.cumsum([0] + [ACTION_FEATURES[k] for k in ACTION_KEYS]).tolist()


def _numbers(value: Any, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def parse_actions(entry: dict[str, Any]) -> tuple[dict[str, list[float]], str | None]:
    """Normalised available actions of one annotation entry (reference rules), or the reason it is malformed.

    trajectory = traj[2:] (metres); command = cmd; speed = speed[1:] (raw); angle = angle[1:] / 780;
    goal = [u / 1600, v / 900] only if z > 0 and 0 < u < 1600 and 0 < v < 900; empty CAN lists are absent.
    """
    actions: dict[str, list[float]] = {}
    if "traj" in entry:
        if not _numbers(entry["traj"], 2 * NUM_KEY_FRAMES):
            return {}, "traj is not a list of 10 finite numbers"
        actions["trajectory"] = [float(v) for v in entry["traj"][2:]]
    if "cmd" in entry:
        cmd = entry["cmd"]
        if isinstance(cmd, bool) or not isinstance(cmd, int) or cmd not in COMMANDS.values():
            return {}, f"cmd is not one of {sorted(COMMANDS.values())}"
        actions["command"] = [float(cmd)]
    for key, scale in (("speed", 1.0), ("angle", STEERING_WHEEL_RANGE_DEG)):
        if key in entry and entry[key] != []:
            if not _numbers(entry[key], NUM_KEY_FRAMES):
                return {}, f"{key} is neither [] nor a list of 5 finite numbers"
            actions[key] = [float(v) / scale for v in entry[key][1:]]
    if "goal" in entry or "z" in entry:
        goal, z = entry.get("goal"), entry.get("z")
        if not _numbers(goal, 2) or not _numbers([z], 1):
            return {}, "goal is not [u, v] with a numeric z"
        width, height = GOAL_IMAGE_SIZE
        if z > 0 and 0 < goal[0] < width and 0 < goal[1] < height:
            actions["goal"] = [goal[0] / width, goal[1] / height]
    return actions, None


class NuScenesSubset:
    """nuScenes CAM_FRONT clips with trajectory / command / speed / angle / goal actions (annotation JSON)."""

    def __init__(self, data_root: str = "data/nuscenes",
                 anno_file: str | Sequence[str] = "annos/nuScenes.json", *, num_frames: int = NUM_FRAMES,
                 target_height: int = 320, target_width: int = 576, turn_repeat: int = 5,
                 complete_repeat: int = 2, jpeg_draft: bool = True, strict: bool = False):
        check_target_size(target_height, target_width)
        for name, value in (("turn_repeat", turn_repeat), ("complete_repeat", complete_repeat)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1 (1 disables the re-balancing)")
        self.num_frames = num_frames
        self.target_height = target_height
        self.target_width = target_width
        self.jpeg_draft = jpeg_draft
        self.root = MediaRoot(data_root)
        frames: list[tuple[str, ...]] = []
        values: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        rejected: dict[str, list[str]] = {}
        for entry in read_json_list(anno_file):
            reason = self._frames_problem(entry)
            actions: dict[str, list[float]] = {}
            if reason is None:
                actions, reason = parse_actions(entry)
            if reason is not None:
                rejected.setdefault(reason, []).append(str(entry)[:200])
                continue
            row = np.zeros(_OFFSETS[-1], dtype=np.float32)
            for i, key in enumerate(ACTION_KEYS):
                if key in actions:
                    row[_OFFSETS[i]:_OFFSETS[i + 1]] = actions[key]
            frames.append(tuple(os.path.normpath(p) for p in entry["frames"][:num_frames]))
            values.append(row)
            masks.append(np.array([key in actions for key in ACTION_KEYS]))
        self.n_rejected = sum(len(v) for v in rejected.values())
        if rejected:
            message = f"nuScenes anno_file={anno_file!r}: rejected {self.n_rejected} entries: " \
                      f"{summarize_rejections(rejected)}"
            if strict:
                raise ValueError(message + " (strict=True)")
            log.warning(message)
        if not frames:
            raise ValueError(f"nuScenes anno_file={anno_file!r} has no valid clip of num_frames={num_frames}")
        self._frames = frames
        self._values = np.stack(values)
        self._mask = np.stack(masks)
        self._order = self._rebalance(turn_repeat, complete_repeat)
        log.info("nuScenes %r: %d clips, %d after re-balancing", anno_file, len(frames), len(self._order))

    def _frames_problem(self, entry: Any) -> str | None:
        if not isinstance(entry, dict):
            return "entry is not an object"
        paths = entry.get("frames")
        if not isinstance(paths, list) or len(paths) < self.num_frames:
            return f"frames is not a list of at least num_frames={self.num_frames} paths"
        for rel in paths[:self.num_frames]:
            problem = self.root.path_problem(rel)
            if problem is not None:
                return f"frame path {problem}"
            if not self.root.dir_inside(os.path.dirname(os.path.normpath(rel))):
                return "frame path escapes data_root through a symlink"
        return None

    def _rebalance(self, turn_repeat: int, complete_repeat: int) -> np.ndarray:
        # Reference order: x turn_repeat for turning commands, then x complete_repeat for samples whose speed,
        # angle and goal are all valid (counted over the already re-balanced list); copies go to the end.
        order = np.arange(len(self._frames))
        cmd = self._values[:, _OFFSETS[0]]
        has_cmd = self._mask[:, 0]
        turns = order[has_cmd & np.isin(cmd, TURN_COMMANDS)]
        order = np.concatenate([order] + [turns] * (turn_repeat - 1))
        complete = self._mask[:, 2] & self._mask[:, 3] & self._mask[:, 4]
        order = np.concatenate([order] + [order[complete[order]]] * (complete_repeat - 1))
        return order

    def __len__(self) -> int:
        return len(self._order)

    def clip_key(self, index: int) -> int:
        """The annotation entry behind `index`: re-balanced copies of a clip share it (the latent cache encodes
        each entry once)."""
        return int(self._order[index])

    def load_clip(self, index: int) -> Clip:
        """Decode clip `index` (uint8 (T, 3, H, W)) with its available normalised actions."""
        row = int(self._order[index])
        paths = [self.root.open_path(p) for p in self._frames[row]]
        frames = load_image_sequence(paths, self.target_height, self.target_width, draft=self.jpeg_draft)
        actions = {key: torch.from_numpy(self._values[row, _OFFSETS[i]:_OFFSETS[i + 1]].copy())
                   for i, key in enumerate(ACTION_KEYS) if self._mask[row, i]}
        return Clip(frames=frames, actions=actions, source=paths[0])


# ----------------------------------------------------------------------------------------------------------
# Annotation builder (nuscenes-devkit is imported only here: it raises Pillow's global bomb limit).


def _pose_matrix(record: dict[str, Any]) -> np.ndarray:
    from pyquaternion import Quaternion

    matrix = np.eye(4)
    matrix[:3, :3] = Quaternion(record["rotation"]).rotation_matrix
    matrix[:3, 3] = record["translation"]
    return matrix


def _can_series(can_bus: Any, scene_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(utime, vehicle_speed km/h, steering deg) of a scene's `vehicle_monitor` messages; None if none."""
    if can_bus is None or int(scene_name[-4:]) in can_bus.can_blacklist:
        return None
    try:
        messages = can_bus.get_messages(scene_name, "vehicle_monitor", print_warnings=False)
    except FileNotFoundError:
        return None
    if not messages:
        return None
    messages = sorted(messages, key=lambda m: m["utime"])
    return (np.array([m["utime"] for m in messages], dtype=np.float64),
            np.array([m["vehicle_speed"] for m in messages], dtype=np.float64),
            np.array([m["steering"] for m in messages], dtype=np.float64))


def clip_annotation(nusc: Any, key_tokens: Sequence[str], frames: Sequence[str],
                    can: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """One annotation entry from the CAM_FRONT sample_data tokens of 5 key frames and the clip's frames."""
    records = [nusc.get("sample_data", t) for t in key_tokens]
    global_from_ego = [_pose_matrix(nusc.get("ego_pose", r["ego_pose_token"])) for r in records]
    ego0_from_global = np.linalg.inv(global_from_ego[0])
    positions = [ego0_from_global @ m[:, 3] for m in global_from_ego]
    traj = [float(v) for p in positions for v in p[:2]]
    sensor = nusc.get("calibrated_sensor", records[0]["calibrated_sensor_token"])
    cam_from_ego0 = np.linalg.inv(_pose_matrix(sensor))
    point = cam_from_ego0 @ positions[-1]
    z = float(point[2])
    if z > 1e-6:
        uv = np.asarray(sensor["camera_intrinsic"], dtype=np.float64) @ point[:3]
        goal = [float(uv[0] / uv[2]), float(uv[1] / uv[2])]
    else:
        goal = [-1.0, -1.0]
    speed: list[float] = []
    angle: list[float] = []
    if can is not None:
        times = np.array([r["timestamp"] for r in records], dtype=np.float64)
        speed = np.interp(times, can[0], can[1]).tolist()
        angle = np.interp(times, can[0], can[2]).tolist()
    return {"frames": list(frames), "traj": traj, "cmd": command_from_endpoint(traj[-2], traj[-1]),
            "speed": speed, "angle": angle, "goal": goal, "z": z}


def build_annotations(nusc: Any, can_bus: Any, scene_names: Sequence[str], num_frames: int = NUM_FRAMES
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Annotation entries for every key frame of the given scenes that starts a full clip, plus statistics."""
    wanted = set(scene_names)
    entries: list[dict[str, Any]] = []
    stats: collections.Counter[str] = collections.Counter()
    keys_at = key_frame_indices(num_frames, NUM_KEY_FRAMES)
    for scene in nusc.scene:
        if scene["name"] not in wanted:
            continue
        stats["scenes"] += 1
        can = _can_series(can_bus, scene["name"])
        stats["scenes_without_can"] += can is None
        samples = []
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            samples.append(sample["data"]["CAM_FRONT"])
            token = sample["next"]
        for i in range(len(samples) - NUM_KEY_FRAMES + 1):
            frames, sd_tokens = [], []
            token = samples[i]
            while token and len(frames) < num_frames:
                record = nusc.get("sample_data", token)
                frames.append(record["filename"])
                sd_tokens.append(token)
                token = record["next"]
            if len(frames) < num_frames:
                stats["short_clips_skipped"] += 1
                continue
            key_tokens = samples[i:i + NUM_KEY_FRAMES]
            stats["key_frames_off_grid"] += [sd_tokens[k] for k in keys_at] != list(key_tokens)
            entry = clip_annotation(nusc, key_tokens, frames, can)
            stats[f"cmd_{entry['cmd']}"] += 1
            stats["goal_valid"] += "goal" in parse_actions(entry)[0]
            entries.append(entry)
    stats["clips"] = len(entries)
    return entries, dict(stats)


def _build(args: argparse.Namespace) -> None:
    if not os.path.isdir(args.data_root):
        raise FileNotFoundError(f"--data_root={args.data_root!r} is not an existing directory (the nuScenes root "
                                "holding v1.0-trainval/, samples/, sweeps/)")
    if not os.path.isdir(os.path.join(args.data_root, args.version)):
        present = sorted(d for d in os.listdir(args.data_root)
                         if d.startswith("v1.0-") and os.path.isdir(os.path.join(args.data_root, d)))
        hint = (f"; present: {', '.join(present)} (pass --version {present[0]})" if present else
                "; no v1.0-* table folder is there: point --data_root at the folder that holds them")
        raise FileNotFoundError(f"--data_root={args.data_root!r} has no table folder {args.version!r}{hint}")
    can_root = args.can_bus_root or args.data_root
    if not args.no_can_bus and not os.path.isdir(os.path.join(can_root, "can_bus")):
        raise FileNotFoundError(f"--can_bus_root={can_root!r} has no can_bus/ folder (the nuScenes CAN bus "
                                "expansion, https://www.nuscenes.org/download); pass --no_can_bus to write empty "
                                "speed/angle lists")
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    if args.split != "all" and args.split not in splits:
        raise ValueError(f"--split={args.split!r} is not one of {['all', *sorted(splits)]}")
    can_bus = None if args.no_can_bus else NuScenesCanBus(dataroot=can_root)
    nusc = NuScenes(version=args.version, dataroot=args.data_root, verbose=False)
    names = [s["name"] for s in nusc.scene] if args.split == "all" else splits[args.split]
    if not set(names) & {s["name"] for s in nusc.scene}:
        raise ValueError(f"--split={args.split!r} has no scene in {args.version!r}")
    entries, stats = build_annotations(nusc, can_bus, names, num_frames=args.num_frames)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    print(json.dumps({"out": args.out, **stats}, sort_keys=True))


def parser(prog: str = "python -m vwm.data.nuscenes") -> argparse.ArgumentParser:
    """The annotation builder's argument parser (`vwm data nuscenes build ...`)."""
    p = argparse.ArgumentParser(prog=prog)
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write annotation JSON (reference schema) from raw nuScenes")
    build.add_argument("--data_root", "--dataroot", "--data-root", dest="data_root", required=True,
                       help="nuScenes root holding <version>/, samples/, sweeps/")
    build.add_argument("--version", default="v1.0-trainval")
    build.add_argument("--split", default="train",
                       help="a nuscenes-devkit split (train, val, mini_train, ...) or 'all'")
    build.add_argument("--out", required=True)
    build.add_argument("--num_frames", "--num-frames", dest="num_frames", type=int, default=NUM_FRAMES)
    build.add_argument("--can_bus_root", "--can-bus-root", dest="can_bus_root", default=None,
                       help="folder holding can_bus/ (default: --data_root)")
    build.add_argument("--no_can_bus", "--no-can-bus", dest="no_can_bus", action="store_true",
                       help="write empty speed/angle lists")
    build.add_argument("--debug", action="store_true", help="full tracebacks for errors (also VWM_DEBUG=1)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m vwm.data.nuscenes") -> int:
    """CLI: `python -m vwm.data.nuscenes build --data_root D --version V --split S --out F`; exit code 2 with a
    one-line message for a user error."""
    return run_cli(prog, lambda a: _build(parser(prog).parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
