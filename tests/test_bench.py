"""The GPU benchmark script runs its real code path on CPU with the tiny config and reports what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import clean_subprocess_env
from helpers import REPO


@pytest.mark.slow
def test_train_step_bench_times_real_steps_and_profiles_the_host(tmp_path):
    host = tmp_path / "host.txt"
    cmd = [sys.executable, os.path.join(REPO, "bench", "train_step.py"), "--config",
           os.path.join(REPO, "configs", "tiny", "train.yaml"), "--accelerator", "cpu", "--strategy", "auto",
           "--precision", "32", "--height", "64", "--width", "64", "--warmup", "1", "--steps", "2",
           "--host-profile", str(host)]
    out = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert row["steps_timed"] == 2 and row["steps_total"] == 3 and row["losses_finite"]
    assert 0 < row["step_s_min"] <= row["step_s_median"] <= row["step_s_max"]
    assert row["resolution"] == "5x64x64" and row["compile"] is False
    assert "run_backward" in host.read_text()  # the profile covers the timed steps' backward passes
