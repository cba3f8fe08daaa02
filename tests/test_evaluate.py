"""evaluate.py end to end on CPU: the tiny model on tiny nuScenes-format data (toy-world frames with nuScenes
annotations), feature networks from local weight files, per-clip records, the summary, the real-feature cache,
sharding, resuming after a kill without generating a finished clip twice, and the user errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, clean_subprocess_env
from helpers import build_tiny, tiny_config
from safetensors.torch import save_file

from vwm.cli.evaluate import main
from vwm.config import to_container
from vwm.data.toyworld import write_dataset
from vwm.eval.features import random_init_
from vwm.eval.i3d import InceptionI3d
from vwm.eval.inception import FIDInceptionV3

FRAMES = 9  # the shortest clip I3D accepts
TOY_CAMERA = ["--intrinsics", "1266.4", "1266.4", "800", "360"]  # toy-world frames: their own camera


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, data root, annotation file, inception file, its sha256, i3d file, its sha256)."""
    root = tmp_path_factory.mktemp("eval")
    override = f"model.params.num_frames={FRAMES}"
    state = {k: v.detach().clone().contiguous() for k, v in build_tiny(override).state_dict().items()}
    ckpt = str(root / "tiny.safetensors")
    save_file(state, ckpt, metadata={"vwm_config": json.dumps({"model": to_container(tiny_config(override).model)})})
    _, anno = write_dataset(str(root / "nus"), 4, FRAMES, 64, 64, seed=2)
    files = []
    for cls, name in ((FIDInceptionV3, "inception_random.pth"), (InceptionI3d, "i3d_random.pt")):
        path = str(root / name)
        torch.save(random_init_(cls(), seed=1).state_dict(), path)
        files += [path, hashlib.sha256(open(path, "rb").read()).hexdigest()]
    return (ckpt, str(root / "nus"), anno, *files)


def _args(setup, out, *extra):
    ckpt, data_root, anno, inception, inception_sha, i3d, i3d_sha = setup
    return ["--ckpt", ckpt, "--data_root", data_root, "--anno_file", anno, "--out", str(out), "--inception",
            inception, "--inception_sha256", inception_sha, "--i3d", i3d, "--i3d_sha256", i3d_sha, "--height",
            "64", "--width", "64", "--n_steps", "2", "--fvd_frames", str(FRAMES), *TOY_CAMERA, *extra]


def _events(out):
    with open(os.path.join(out, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_evaluate_end_to_end_writes_records_a_summary_and_caches_the_real_features(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, "--limit", "3", "--batch_size", "2")) == 0
    printed = capsys.readouterr()
    assert "3 clips, FID " in printed.out and "FVD-9 " in printed.out and "clips/s per process" in printed.out
    assert "clip/s" in printed.err or "s/clip" in printed.err  # the progress bar (rate and ETA)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"] == 3 and summary["fid_samples"] == 3 * (FRAMES - 1) and summary["fvd_9_samples"] == 3
    assert summary["fid"] > 0 and summary["fvd_9"] > 0  # random but distinct features: a real distance
    assert summary["action_following"]["clips"] == 3
    truth = summary["action_following_ground_truth"]  # the estimator on the real clips: follows their actions
    assert truth["heading_error_deg"] < 5.0
    assert summary["weights"] == {"inception": setup[4], "i3d": setup[6]}
    assert not summary["comparable_to_vista_protocol"]
    assert summary["differences_from_vista_protocol"]["n_steps"] == [2, 50]
    assert summary["seconds_per_clip"] > 0 and summary["projected_hours_full_set_one_process"] > 0
    for i in range(3):
        record = json.loads((out / "clips" / f"nuscenes_{i:06d}.json").read_text())
        assert record["index"] == i and set(record["seconds"]) >= {"generate", "features", "action", "clip"}
        assert record["batch"] == (["nuscenes_000000", "nuscenes_000001"] if i < 2 else ["nuscenes_000002"])
    assert sorted(e["name"] for e in _events(out)) == [f"nuscenes_{i:06d}" for i in range(3)]
    # a second evaluation (another model output folder) reuses the cached real features
    cache = next((out / "real_features").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    out2 = tmp_path / "run2"
    assert main(_args(setup, out2, "--limit", "1", "--real_cache", str(out / "real_features"),
                      "--seed", "5")) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.name in stamps} == stamps
    summary2 = json.loads((out2 / "summary.json").read_text())
    assert summary2["clips"] == 1 and not (out2 / "real_features").exists()
    # --summarize_only recomputes the same numbers from the records
    assert main(_args(setup, out, "--limit", "3", "--summarize_only")) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["fid"] == pytest.approx(summary["fid"], rel=1e-12)
    # a --limit run extends to more clips: only the new one is generated
    assert main(_args(setup, out, "--limit", "4")) == 0
    assert sorted(e["name"] for e in _events(out)) == [f"nuscenes_{i:06d}" for i in range(4)]
    assert json.loads((out / "summary.json").read_text())["clips"] == 4


@pytest.mark.slow
def test_a_killed_evaluation_resumes_without_generating_a_finished_clip_twice(setup, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "evaluate.py"), *_args(setup, out, "--metrics", "fid", "action")]
    proc = subprocess.Popen(cmd, env=clean_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=str(tmp_path))
    clips = out / "clips"
    deadline = time.time() + 300
    while time.time() < deadline and not (clips.is_dir() and len(list(clips.glob("*.json"))) >= 2):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {e["name"]: e["run"] for e in _events(out)}
    assert 2 <= len(before) < 4 and not (out / "summary.json").exists()
    result = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, cwd=str(tmp_path),
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = _events(out)
    names = [e["name"] for e in events]
    assert sorted(names) == [f"nuscenes_{i:06d}" for i in range(4)]  # every clip generated exactly once
    assert {e["name"]: e["run"] for e in events if e["name"] in before} == before  # finished ones kept
    assert len({e["run"] for e in events}) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"] == 4 and summary["fid_samples"] == 4 * (FRAMES - 1) and "fvd_9" not in summary


@pytest.mark.slow
def test_shards_split_the_clips_and_the_last_one_writes_the_summary(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = _args(setup, out, "--metrics", "action", "--limit", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(args) == 0
    assert "shard done; 2 of 3 clips remain" in capsys.readouterr().out
    assert not (out / "summary.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"] == 3 and summary["weights"] == {}
    records = [json.loads(p.read_text()) for p in (out / "clips").glob("*.json")]
    ranks = {r["index"]: r["rank"] for r in records}
    assert ranks == {0: 0, 1: 1, 2: 0}
    # a lost real-feature record is recomputed without generating its clip again
    next((out / "real_features").glob("*/nuscenes_000001.json")).unlink()
    (out / "summary.json").unlink()
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0
    assert (out / "summary.json").exists() and len(_events(out)) == 3


def test_user_errors_name_the_flag_the_value_and_what_is_allowed(setup, tmp_path, capsys):
    ckpt, data_root, anno, inception, *_ = setup
    base = ["--ckpt", ckpt, "--data_root", data_root, "--anno_file", anno, "--height", "64", "--width", "64"]
    cases = [
        ([*base, "--out", str(tmp_path / "a"), "--metrics", "fid"], "pass --inception PATH; vwm cannot download"),
        ([*base, "--out", str(tmp_path / "b"), "--metrics", "fid", "--inception", inception],
         "does not start with 6726825d"),
        ([*base, "--out", str(tmp_path / "c")], "fvd_frames=[25, 16] is invalid; allowed: clip lengths between 9"),
        ([*base, "--out", str(tmp_path / "d"), "--metrics", "action", "--limit", "0"], "--limit=0 is invalid"),
        (["--ckpt", ckpt, "--out", str(tmp_path / "e"), "--metrics", "action", "--data_root", str(tmp_path / "none")],
         "--data_root="),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, message
    # resuming into a folder of another protocol is refused
    out = tmp_path / "f"
    argv = [*base, "--out", str(out), "--metrics", "action", "--limit", "1", "--n_steps", "1"]
    assert main(argv) == 0
    assert main([*argv[:-1], "2"]) == 2
    assert "holds an evaluation of a different run (differs in: protocol" in capsys.readouterr().err


def test_dry_run_prints_the_protocol_and_the_shard_plan(setup, tmp_path, capsys):
    ckpt, data_root, anno, *_ = setup
    assert main(["--ckpt", ckpt, "--data_root", data_root, "--anno_file", anno, "--out", str(tmp_path / "x"),
                 "--fvd_frames", "9", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["clips"] == 4 and plan["shard_clips"] == 4 and plan["protocol"]["height"] == 576
    assert plan["protocol"]["action"] == "free" and plan["protocol"]["fid_skip_frames"] == 1
    assert not (tmp_path / "x").exists()
