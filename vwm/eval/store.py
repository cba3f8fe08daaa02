"""On-disk state of an evaluation run: per-clip records and features, the real-feature cache, the event log,
and the summary computed from them.

    OUT/run.json                 the run's identity (protocol, model, data); a rerun must match it
    OUT/clips/<name>.npz         features of the generated clip (fid: (F, 2048), fvd<n>: (400,))
    OUT/clips/<name>.json        the clip's record; its presence marks the clip done (written last,
    atomically)
    OUT/events.jsonl             one line per clip generated (which run and rank made it)
    OUT/summary.json             FID, FVD, action following, timings (written when every clip is done)
    CACHE/<key>/<name>.npz|json  the same for the real clip, keyed by everything that changes real features

Every file is written to a temporary name and renamed, so a killed process leaves either a complete file or
none; a clip is generated again only if its record is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vwm.eval.action_score import agreement
from vwm.eval.frechet import RunningStats, feature_distance
from vwm.fsio import atomic_write_bytes


def atomic_write_json(path: str, obj: Any) -> None:
    """JSON (indented) written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed npz written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def feature_arrays(fid: np.ndarray | None, fvd: dict[int, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The npz content of one clip's features."""
    out = {} if fid is None else {"fid": fid.astype(np.float32)}
    for n, logits in (fvd or {}).items():
        out[f"fvd{n}"] = logits.astype(np.float32)
    return out


def cache_key(identity: dict[str, Any]) -> str:
    """Short content hash of everything that determines the real features."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class ClipStore:
    """One folder of per-clip records (`<name>.json`) and features (`<name>.npz`)."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def record_path(self, name: str) -> str:
        """Path of a clip's record."""
        return os.path.join(self.folder, f"{name}.json")

    def done(self, name: str) -> bool:
        """True when the clip's record (written after its features) exists."""
        return os.path.isfile(self.record_path(name))

    def write(self, name: str, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Features first, then the record that marks the clip done."""
        if arrays:
            atomic_write_npz(os.path.join(self.folder, f"{name}.npz"), arrays)
        atomic_write_json(self.record_path(name), record)

    def read(self, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(record, features) of a done clip."""
        with open(self.record_path(name), encoding="utf-8") as f:
            record = json.load(f)
        path = os.path.join(self.folder, f"{name}.npz")
        arrays = dict(np.load(path)) if os.path.isfile(path) else {}
        return record, arrays


def append_event(path: str, event: dict[str, Any]) -> None:
    """Append one JSON line (O_APPEND: lines of concurrent ranks do not interleave)."""
    line = (json.dumps(event, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def summarize(names: Sequence[str], generated: ClipStore, real: ClipStore, fvd_frames: Iterable[int],
              metrics: Sequence[str]) -> dict[str, Any]:
    """FID, FVD and action following over the named clips (all must be done), plus timing totals."""
    stats: dict[str, tuple[RunningStats, RunningStats]] = {}
    if "fid" in metrics:
        stats["fid"] = (RunningStats(2048), RunningStats(2048))
    for n in fvd_frames if "fvd" in metrics else ():
        stats[f"fvd{n}"] = (RunningStats(400), RunningStats(400))
    scores_gen, scores_real = [], []
    seconds: dict[str, float] = {}
    devices: set[str] = set()
    for name in names:
        rec_gen, arr_gen = generated.read(name)
        rec_real, arr_real = real.read(name)
        for key, (acc_real, acc_gen) in stats.items():
            acc_real.add(np.atleast_2d(arr_real[key]))
            acc_gen.add(np.atleast_2d(arr_gen[key]))
        if "action" in metrics and rec_gen.get("action") is not None and rec_real.get("action") is not None:
            scores_gen.append(rec_gen["action"])
            scores_real.append(rec_real["action"])
        for stage, value in rec_gen.get("seconds", {}).items():
            seconds[stage] = seconds.get(stage, 0.0) + float(value)
        devices.add(rec_gen.get("device", "?"))
    out: dict[str, Any] = {"clips": len(names)}
    for key, (acc_real, acc_gen) in stats.items():
        label = "fid" if key == "fid" else f"fvd_{key[3:]}"
        out[label] = feature_distance(acc_real, acc_gen) if acc_real.count >= 2 and acc_gen.count >= 2 else None
        out[f"{label}_samples"] = acc_gen.count
    if "action" in metrics:
        out["action_following"] = agreement(scores_gen) if scores_gen else None
        out["action_following_ground_truth"] = agreement(scores_real) if scores_real else None
    out["seconds_total"] = {k: round(v, 3) for k, v in sorted(seconds.items())}
    busy = seconds.get("clip", 0.0)
    out["seconds_per_clip"] = round(busy / len(names), 4) if names and busy else None
    out["clips_per_s_per_process"] = round(len(names) / busy, 6) if busy else None
    out["devices"] = sorted(devices)
    return out
