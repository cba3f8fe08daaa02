"""scripts/demo.py (what `make demo` runs) end to end on a 2-step budget: train, export, two steered rollouts,
loss plot and summary, through the real CLIs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, clean_subprocess_env


@pytest.mark.slow
def test_demo_script_runs_end_to_end_and_reports_its_verdict(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "demo.py"), "--out", str(out),
                             "--max_steps", "2", "--indices", "0", "1"], env=clean_subprocess_env(),
                            capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["start_frames_where_left_turns_more_left_than_right"].endswith("/2")
    assert 0.0 < summary["sign_test_p_value"] <= 1.0 and isinstance(summary["follows_steering"], bool)
    for index in (0, 1):  # the measure orders the ground truth the commanded way
        motion = summary["lateral_motion"]
        assert motion["steer_left"][str(index)]["ground_truth"] > motion["steer_right"][str(index)]["ground_truth"]
    # the action-following score of the rollouts and their PSNR against the toy world's true future
    following = summary["action_following"]
    assert following["start_frames_where_left_heads_more_left_than_right"].endswith("/2")
    assert following["generated"]["clips"] == 4 and following["ground_truth"]["clips"] == 4
    truth = following["final_heading_deg"]
    assert truth["steer_left"]["commanded"] > 5 > -5 > truth["steer_right"]["commanded"]
    assert following["ground_truth"]["turn_direction_accuracy"] == 1.0  # the estimator reads the true future right
    assert len(summary["psnr_db_per_frame"]) == 7 and 0 < summary["psnr_db_mean"] < 100
    assert "action following" in result.stdout and "PSNR against the true future" in result.stdout
    for name in ("loss.png", "steer_left_vs_right.mp4", "toyworld.safetensors"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "steer_left" / "toy_000001" / "frames").glob("generated_*.png"))) == 8
    # the rollouts are sampled with the demo's settings (the schedule stops where the model was trained)
    script = os.path.join(REPO_ROOT, "scripts", "demo.py")
    spec = importlib.util.spec_from_file_location("demo_script", script)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    sampling = demo.SAMPLING
    assert sampling["sigma_min"] > 1.0 and summary["sampling"] == sampling
    for name in ("steer_left", "steer_right"):
        settings = json.loads((out / name / "toy_000000" / "sample.json").read_text())["settings"]
        assert {k: settings[k] for k in sampling} == sampling
    assert "outputs in" in result.stdout
