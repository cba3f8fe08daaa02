"""The in-training evaluation callback through train.py: registered from the config, sharded over two DDP ranks,
fixed noise (the same weights give the same numbers at every evaluation), logged to TensorBoard and to
<run>/eval/metrics.jsonl."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import clean_subprocess_env
from helpers import REPO

from vwm.eval.callback import EvaluationCallback
from vwm.eval.features import random_init_
from vwm.eval.inception import FIDInceptionV3
from vwm.eval.weights import FeatureWeightsError


@pytest.mark.slow
def test_callback_evaluates_a_fixed_subset_sharded_over_ranks_with_fixed_noise(tmp_path):
    weights = tmp_path / "inception_random.pth"
    torch.save(random_init_(FIDInceptionV3(), seed=1).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    extra = tmp_path / "eval.yaml"
    extra.write_text(f"""
model:
  base_learning_rate: 0.0     # the weights never change, so every evaluation must give the same numbers
lightning:
  callbacks:
    evaluation:
      target: vwm.eval.callback.EvaluationCallback
      params:
        every_n_steps: 1
        clips: 3
        n_steps: 2
        metrics: [fid, action]
        inception: {weights}
        inception_sha256: {digest}
        camera: toy
        subset: {{target: vwm.data.toyworld.ToyWorldSubset, params: {{seed: 1, length: 10}}}}
""")
    tiny = os.path.join(REPO, "configs", "tiny", "train.yaml")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--base", tiny, str(extra), "--logdir",
           str(tmp_path / "logs"), "--name", "cb", "--accelerator", "cpu", "--n_devices", "2", "--max_steps", "2"]
    result = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    run = tmp_path / "logs" / "cb"
    rows = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 writes once per evaluation
    assert rows[0]["eval/clips"] == 3  # gathered from both ranks (2 + 1 clips)
    for key in ("eval/fid", "eval/heading_error_deg", "eval/heading_error_deg_ground_truth"):
        assert key in rows[0] and rows[0][key] == rows[1][key], key
    assert rows[0]["eval/fid"] > 0 and rows[0]["eval/seconds"] > 0
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"eval/fid" in events and b"eval/heading_error_deg" in events


def test_callback_parameters_are_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"every_n_steps=0 is invalid; allowed: an int >= 1"):
        EvaluationCallback(every_n_steps=0, metrics=["action"])
    with pytest.raises(ValueError, match=r"metrics=\['psnr'\] is invalid"):
        EvaluationCallback(metrics=["psnr"])
    with pytest.raises(FeatureWeightsError, match="pass EvaluationCallback inception PATH"):
        EvaluationCallback(metrics=["fid"])
