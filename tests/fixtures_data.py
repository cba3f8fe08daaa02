"""Generators of small data fixtures for the data-pipeline tests: OpenDV frame folders and mp4s, broken media
of every kind, and a nuScenes-format dataset (13 tables, 12 Hz CAM_FRONT sweeps, 2 Hz key frames, ego poses
on known paths, CAN bus `vehicle_monitor` files, a map PNG) whose annotation values are known in closed
form."""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

FRAME_W, FRAME_H = 128, 72
"""Fixture frames are 16:9 like nuScenes and most OpenDV videos."""


def frame_array(index: int, tag: int = 0, width: int = FRAME_W, height: int = FRAME_H) -> np.ndarray:
    """A frame whose red channel encodes `index` (8 * index mod 256), green `tag`; blue is a ramp."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[..., 0] = (8 * index) % 256
    a[..., 1] = (40 * tag) % 256
    a[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    return a


def write_frame_folder(root: str, rel: str, count: int, *, start: int = 0, pad: int = 9, ext: str = "jpg",
                       tag: int = 0) -> list[str]:
    """DriveAGI-style folder of `count` consecutive frames `%0{pad}d.{ext}`; returns the file paths."""
    folder = os.path.join(root, rel)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = os.path.join(folder, f"{i:0{pad}d}.{ext}")
        Image.fromarray(frame_array(i, tag)).save(path, quality=95)
        paths.append(path)
    return paths


def write_mp4(path: str, count: int, *, fps: int = 10, width: int = FRAME_W, height: int = FRAME_H,
              tag: int = 0) -> str:
    """H.264 mp4 (PyAV) of `count` frames made by `frame_array`, a key frame every 10 frames."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": "10", "preset": "ultrafast", "crf": "10"}
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(frame_array(i, tag, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(path: str, fraction: float = 0.5) -> str:
    """Cut a file to `fraction` of its bytes (a truncated JPEG, an mp4 without its moov atom)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return path


def png_with_bad_crc(path: str) -> str:
    """A PNG whose IHDR chunk CRC is wrong (Pillow checks header CRCs; IDAT damage shows as zlib errors)."""
    Image.fromarray(frame_array(0)).save(path, format="PNG")
    data = bytearray(open(path, "rb").read())
    data[8 + 8 + 13] ^= 0xFF  # signature, IHDR length + type, 13 bytes of IHDR body, then its CRC
    open(path, "wb").write(bytes(data))
    return path


def png_with_corrupt_data(path: str) -> str:
    """A PNG whose compressed IDAT payload is overwritten mid-stream."""
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (FRAME_H, FRAME_W, 3), dtype=np.uint8)).save(
        path, format="PNG")
    data = bytearray(open(path, "rb").read())
    idat = data.index(b"IDAT")
    data[idat + 40: idat + 400] = bytes(360)
    open(path, "wb").write(bytes(data))
    return path


def png_bomb(path: str, side: int = 40_000) -> str:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")
    open(path, "wb").write(data)
    return path


BROKEN_KINDS: dict[str, Callable[[str], None]] = {
    "truncated": lambda p: (Image.fromarray(frame_array(1)).save(p, format="JPEG"), truncate(p, 0.5)),
    "empty": lambda p: open(p, "wb").close(),
    "random_bytes": lambda p: open(p, "wb").write(np.random.default_rng(0).bytes(2000)),
    "bad_crc_png": png_with_bad_crc,
    "corrupt_png": png_with_corrupt_data,
    "missing": lambda p: None,
    "directory": lambda p: os.makedirs(p),
    "bomb": png_bomb,
}
"""Ways to break a frame file: each callable writes the broken file at the path it is given."""


# ------------------------------------------------------------------------------------------------ nuScenes

CAM_TRANSLATION = (1.5, 0.0, 1.6)
"""CAM_FRONT position in the ego frame (x forward, y left, z up), metres."""
CAM_INTRINSIC = ((1266.0, 0.0, 816.0), (0.0, 1266.0, 491.0), (0.0, 0.0, 1.0))
CAMERA_HZ = 12
T0 = 1_533_151_514_000_000
"""Timestamp (microseconds) of each scene's first frame."""


@dataclass(frozen=True)
class SceneSpec:
    """A fixture scene: the ego drives at `speed_mps` with yaw rate `yaw_rate` (rad/s) from `start`, heading
    `heading`; CAN speed/steering are linear in time (None: no CAN file for the scene)."""

    name: str
    speed_mps: float
    yaw_rate: float
    start: tuple[float, float]
    heading: float
    can: tuple[float, float, float, float] | None  # speed0 km/h, speed slope /s, steering0 deg, slope /s
    num_samples: int = 7

    def pose(self, t: float) -> tuple[float, float, float]:
        """Global (x, y, yaw) of the ego frame at t seconds after the first frame."""
        yaw = self.heading + self.yaw_rate * t
        if self.yaw_rate == 0.0:
            d = self.speed_mps * t
            return self.start[0] + d * math.cos(self.heading), self.start[1] + d * math.sin(self.heading), yaw
        r = self.speed_mps / self.yaw_rate
        return (self.start[0] + r * (math.sin(yaw) - math.sin(self.heading)),
                self.start[1] - r * (math.cos(yaw) - math.cos(self.heading)), yaw)

    def can_value(self, t: float) -> tuple[float, float]:
        """(vehicle_speed km/h, steering deg) at t seconds."""
        assert self.can is not None
        return self.can[0] + self.can[1] * t, self.can[2] + self.can[3] * t


NUSCENES_SCENES = (
    SceneSpec("scene-0061", 5.0, 0.0, (100.0, 200.0), 0.7, (20.0, 4.0, -30.0, 50.0)),
    SceneSpec("scene-0553", 6.0, 0.4, (-50.0, 30.0), -2.0, (25.0, -2.0, 90.0, 10.0)),
    SceneSpec("scene-0655", 6.0, -0.4, (10.0, -10.0), 3.0, None),
    SceneSpec("scene-0757", 0.0, 0.0, (0.0, 0.0), 1.0, (0.0, 0.0, 5.0, 0.0)),
)
"""Straight with CAN, left arc with CAN, right arc without CAN, standing still with CAN."""


def frame_time(j: int) -> int:
    """Timestamp of camera frame j (12 Hz; every 6th frame is a key frame, exactly 0.5 s apart)."""
    return T0 + round(j * 1_000_000 / CAMERA_HZ)


def _quat_yaw(yaw: float) -> list[float]:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def write_nuscenes(root: str, version: str = "v1.0-mini",
                   scenes: tuple[SceneSpec, ...] = NUSCENES_SCENES) -> None:
    """Write a nuScenes-format dataset (all 13 tables, images, CAN bus JSON, map PNG) under `root`."""
    tables: dict[str, list[dict]] = {k: [] for k in (
        "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
        "scene", "sample", "sample_data", "sample_annotation", "map")}
    tables["category"].append({"token": "cat0", "name": "vehicle.car", "description": "car"})
    tables["attribute"].append({"token": "att0", "name": "vehicle.moving", "description": "moving"})
    tables["visibility"].append({"token": "4", "level": "v80-100", "description": "visible"})
    tables["sensor"] += [{"token": "sensor-cam", "channel": "CAM_FRONT", "modality": "camera"},
                         {"token": "sensor-lidar", "channel": "LIDAR_TOP", "modality": "lidar"}]
    # ego_from_camera: camera z forward -> ego x, camera x right -> ego -y, camera y down -> ego -z.
    cam_rotation = [0.5, -0.5, 0.5, -0.5]
    tables["calibrated_sensor"] += [
        {"token": "cs-cam", "sensor_token": "sensor-cam", "translation": list(CAM_TRANSLATION),
         "rotation": cam_rotation, "camera_intrinsic": [list(r) for r in CAM_INTRINSIC]},
        {"token": "cs-lidar", "sensor_token": "sensor-lidar", "translation": [0.9, 0.0, 1.8],
         "rotation": [1.0, 0.0, 0.0, 0.0], "camera_intrinsic": []}]
    os.makedirs(os.path.join(root, "maps"), exist_ok=True)
    Image.fromarray(np.full((20, 20), 255, dtype=np.uint8)).save(os.path.join(root, "maps", "fixture.png"))
    tables["map"].append({"token": "map0", "category": "semantic_prior", "filename": "maps/fixture.png",
                          "log_tokens": []})
    os.makedirs(os.path.join(root, "can_bus"), exist_ok=True)
    for s, spec in enumerate(scenes):
        log_token, scene_token = f"log{s}", f"scene{s}"
        tables["log"].append({"token": log_token, "logfile": spec.name, "vehicle": "n008",
                              "date_captured": "2018-08-01", "location": "singapore-onenorth"})
        tables["map"][0]["log_tokens"].append(log_token)
        num_frames = 6 * (spec.num_samples - 1) + 1
        sample_tokens = [f"s{s}-sample{k}" for k in range(spec.num_samples)]
        for k, token in enumerate(sample_tokens):
            tables["sample"].append({"token": token, "timestamp": frame_time(6 * k),
                                     "scene_token": scene_token, "prev": sample_tokens[k - 1] if k else "",
                                     "next": sample_tokens[k + 1] if k + 1 < len(sample_tokens) else ""})
        for j in range(num_frames):
            key = j % 6 == 0
            t = frame_time(j)
            x, y, yaw = spec.pose((t - T0) / 1e6)
            ego = f"s{s}-ego{j}"
            tables["ego_pose"].append({"token": ego, "timestamp": t, "translation": [x, y, 0.0],
                                       "rotation": _quat_yaw(yaw)})
            folder = "samples" if key else "sweeps"
            filename = f"{folder}/CAM_FRONT/n008-2018-08-01-15-16-36-0400__CAM_FRONT__{t}.jpg"
            os.makedirs(os.path.join(root, folder, "CAM_FRONT"), exist_ok=True)
            Image.fromarray(frame_array(j, s)).save(os.path.join(root, filename), quality=95)
            tables["sample_data"].append({
                "token": f"s{s}-cam{j}",
                "sample_token": sample_tokens[min(round(j / 6), len(sample_tokens) - 1)],
                "ego_pose_token": ego, "calibrated_sensor_token": "cs-cam", "timestamp": t,
                "fileformat": "jpg",
                "is_key_frame": key, "height": 900, "width": 1600, "filename": filename,
                "prev": f"s{s}-cam{j - 1}" if j else "",
                "next": f"s{s}-cam{j + 1}" if j + 1 < num_frames else ""})
        for k, token in enumerate(sample_tokens):
            tables["sample_data"].append({
                "token": f"s{s}-lidar{k}", "sample_token": token, "ego_pose_token": f"s{s}-ego{6 * k}",
                "calibrated_sensor_token": "cs-lidar", "timestamp": frame_time(6 * k), "fileformat": "pcd",
                "is_key_frame": True, "height": 0, "width": 0,
                "filename": f"samples/LIDAR_TOP/{spec.name}_{k}.pcd.bin",
                "prev": f"s{s}-lidar{k - 1}" if k else "",
                "next": f"s{s}-lidar{k + 1}" if k + 1 < len(sample_tokens) else ""})
        tables["instance"].append({"token": f"inst{s}", "category_token": "cat0", "nbr_annotations": 1,
                                   "first_annotation_token": f"ann{s}", "last_annotation_token": f"ann{s}"})
        tables["sample_annotation"].append({
            "token": f"ann{s}", "sample_token": sample_tokens[0], "instance_token": f"inst{s}",
            "visibility_token": "4", "attribute_tokens": ["att0"], "translation": [x + 10, y, 1.0],
            "size": [1.9, 4.5, 1.6], "rotation": [1.0, 0.0, 0.0, 0.0], "prev": "", "next": "",
            "num_lidar_pts": 10, "num_radar_pts": 0})
        tables["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": spec.num_samples,
                                "first_sample_token": sample_tokens[0],
                                "last_sample_token": sample_tokens[-1],
                                "name": spec.name, "description": "fixture"})
        if spec.can is not None:
            messages = []
            utime = T0 - 300_000
            while utime <= frame_time(num_frames) + 500_000:
                speed, steering = spec.can_value((utime - T0) / 1e6)
                messages.append({"utime": utime, "vehicle_speed": speed, "steering": steering, "brake": 0,
                                 "throttle": 10, "gear_position": 7, "left_signal": 0, "right_signal": 0})
                utime += 500_000
            with open(os.path.join(root, "can_bus", f"{spec.name}_vehicle_monitor.json"), "w") as f:
                json.dump(messages, f)
    os.makedirs(os.path.join(root, version), exist_ok=True)
    for name, rows in tables.items():
        with open(os.path.join(root, version, f"{name}.json"), "w") as f:
            json.dump(rows, f)


def nuscenes_entry(frames: list[str], *, cmd: int = 3, speed: list[float] | None = None,
                   angle: list[float] | None = None, goal: tuple[float, float] = (800.0, 600.0),
                   z: float = 5.0) -> dict:
    """An annotation entry in the reference schema (traj counts 0.0 .. 9.0)."""
    return {"frames": frames, "traj": [float(i) for i in range(10)], "cmd": cmd,
            "speed": [1.0, 2.0, 3.0, 4.0, 5.0] if speed is None else speed,
            "angle": [78.0, 156.0, 234.0, 312.0, 390.0] if angle is None else angle,
            "goal": list(goal), "z": z}
