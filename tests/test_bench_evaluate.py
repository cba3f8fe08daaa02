"""bench/evaluate.py (the GPU throughput measurement of the Vista-protocol evaluation) runs its real code path
on CPU with the tiny config and reports per-clip stage times, clips/s and the projected full-set wall time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import clean_subprocess_env
from helpers import REPO


@pytest.mark.slow
def test_evaluation_bench_reports_clips_per_second_and_the_projected_wall_time(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "bench", "evaluate.py"), "--config",
           os.path.join(REPO, "configs", "tiny", "model.yaml"), "model.params.num_frames=9", "--height", "64",
           "--width", "64", "--frames", "9", "--steps", "2", "--fvd_frames", "9", "--clips", "1", "--device", "cpu"]
    out = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    clip, summary = rows[0], rows[-1]
    assert clip["clip"] == "9x64x64" and clip["generate_s"] > 0 and clip["features_s"] > 0
    assert {"denoise_s", "decode_s"} <= set(clip["stages_s"])
    assert summary["summary"] and summary["clips_per_s"] == pytest.approx(1 / summary["seconds_per_clip"], rel=0.01)
    assert summary["projected_hours_5369_clips_1_device"] == pytest.approx(
        5369 * summary["seconds_per_clip_first_run_with_real_features"] / 3600, abs=0.01)
