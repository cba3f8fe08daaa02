"""What a run survives (issue #12), through the real CLI on CPU: preemption with DataLoader workers, resume that
never unpickles without restriction, non-finite updates refused before they are applied or committed, one run per
run directory, bit rot detected with a fallback to the newest intact checkpoint, partial phase families refused,
and metrics bookkeeping across kills, restarts and full disks. Faults come from tests/faults.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from conftest import clean_subprocess_env
from helpers import REPO, TINY_MODEL, build_tiny

from vwm.checkpoint import CheckpointError, load_weights
from vwm.cli.export import main as export_main

TRAIN = os.path.join(REPO, "train.py")
FAULTS = os.path.join(REPO, "tests", "faults.py")
TINY = os.path.join(REPO, "configs", "tiny", "train.yaml")
ZERO2 = "lightning.trainer.strategy=deepspeed_stage_2"


def _cmd(tmp, name, *args, script=TRAIN):
    return [sys.executable, script, "--base", TINY, "--logdir", str(tmp), "--name", name, "--accelerator", "cpu",
            *args]


def _run(tmp, name, *args, faults="", timeout=600, script=None, env=None):
    env = {**clean_subprocess_env(VWM_FAULTS=faults), **(env or {})}
    return subprocess.run(_cmd(tmp, name, *args, script=script or (FAULTS if faults else TRAIN)), env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=str(tmp))


def _ok(result):
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in _rows(run_dir)]


def _steps(run_dir) -> list[int]:
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(int(n.split("-")[1]) for n in os.listdir(folder) if n.startswith("step-")) \
        if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def full6(tmp_path_factory):
    """An uninterrupted single-process run to step 6 (checkpoints at 3 and 6), the reference for the others."""
    tmp = tmp_path_factory.mktemp("full")
    _ok(_run(tmp, "full", "--max_steps", "6"))
    return tmp / "full"


# ------------------------------------------------------------------------------------------- 1. preemption


@pytest.mark.slow
def test_sigusr1_with_workers_under_slurm_without_scontrol_saves_and_exits_138(tmp_path):
    env = clean_subprocess_env(SLURM_JOB_ID="4242", PATH="/usr/bin:/bin")  # no scontrol there (containers)
    assert shutil.which("scontrol", path=env["PATH"]) is None
    cmd = _cmd(tmp_path, "usr1", "--max_steps", "1000", "lightning.checkpoint.every_n_steps=1000",
               "data.params.num_workers=2")
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "usr1" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGUSR1)  # every process of the job step, DataLoader workers included
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-4000:]
    assert "killed by signal" not in out
    assert "SLURM requeue of job 4242 not requested: scontrol" in out, out[-3000:]
    steps = _steps(tmp_path / "usr1")
    assert len(steps) == 1 and steps[0] >= 2


WORKER_UNDER_JOB_SIGNALS = """
import subprocess, sys, time
sys.path.insert(0, {repo!r})
import vwm
from vwm.config import instantiate, load_config
data = instantiate(load_config({tiny!r}, ["data.params.num_workers=1"]).data, seed=1)
data.setup(rank=0, world_size=1)
batches = iter(data.train_dataloader())
next(batches)
worker = batches._workers[0]
for name in ("TERM", "USR1"):  # from another process, as a scheduler sends them, not from the worker's parent
    subprocess.run(["kill", "-" + name, str(worker.pid)], check=True)
time.sleep(1)
next(batches)
print("worker alive after the job's signals:", worker.is_alive(), flush=True)
"""


def test_a_worker_ignores_the_jobs_signals_but_its_trainer_can_still_terminate_it(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_UNDER_JOB_SIGNALS.format(repo=REPO, tiny=TINY))
    # The script exits with its worker alive: multiprocessing then terminates it (SIGTERM from its parent) and
    # waits for it, which would be forever if the worker ignored every SIGTERM.
    result = subprocess.run([sys.executable, str(script)], env=clean_subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worker alive after the job's signals: True" in result.stdout


# ------------------------------------------------------------------------------------ 2. restricted resume


class Payload:
    """Unpickling this creates `path` (what an attacker's checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def _plant(run_dir, layout: str, canary) -> None:
    """A committed-looking checkpoint step-3 in `run_dir` whose pickles would run code."""
    from vwm.training.checkpointing import write_manifest

    step = run_dir / "checkpoints" / "step-000000003"
    evil = {"module": {"model.w": torch.zeros(2)}, "hook": Payload(canary)}
    if layout == "lightning-manifest-deepspeed-dir":  # lightning.ckpt is a directory DeepSpeed would load
        tag = step / "lightning.ckpt" / "checkpoint"
        tag.mkdir(parents=True)
        (step / "lightning.ckpt" / "latest").write_text("checkpoint")
        torch.save(evil, tag / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        fmt = "lightning"
    elif layout == "poisoned-lightning-ckpt":
        step.mkdir(parents=True)
        torch.save({"state_dict": {"model.w": torch.zeros(2)}, "hook": Payload(canary)}, step / "lightning.ckpt")
        fmt = "lightning"
    else:  # a DeepSpeed directory with a poisoned optimizer shard
        tag = step / "checkpoint"
        tag.mkdir(parents=True)
        (step / "latest").write_text("checkpoint")
        torch.save({"module": {"model.w": torch.zeros(2)}, "dp_world_size": 1}, tag / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": Payload(canary)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        fmt = "deepspeed"
    write_manifest(str(step), {"step": 3, "format": fmt, "world_size": 1})


@pytest.mark.slow
@pytest.mark.parametrize("layout, strategy", [
    ("lightning-manifest-deepspeed-dir", "deepspeed_stage_2"),
    ("poisoned-lightning-ckpt", "ddp"),
    ("poisoned-deepspeed-shard", "deepspeed_stage_2"),
])
def test_resume_unpickles_every_file_with_the_restricted_loader(tmp_path, layout, strategy):
    canary = tmp_path / "canary"
    _plant(tmp_path / "evil", layout, canary)
    result = _run(tmp_path, "evil", "--resume", "auto", "--max_steps", "6", f"lightning.trainer.strategy={strategy}")
    assert not canary.exists()
    assert result.returncode != 0
    assert "refused to unpickle" in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------------------------ 3. non-finite updates


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fault, devices, strategy, message, precision", [
    ("nan_grad:2:1", 2, "ddp", "non-finite gradient norm at step 2 (in the gradients of rank(s) [0, 1]", "32"),
    ("nan_grad:2:1", 2, "deepspeed_stage_2", "non-finite gradient norm at step 2", "32"),
    # bf16 ZeRO-2: DeepSpeed's own overflow check is off (vwm.training.zero_step); vwm's guard refuses the update
    ("nan_grad:2:0", 1, "deepspeed_stage_2", "non-finite gradient norm at step 2 (in the gradients of rank(s) [0]",
     "bf16-mixed"),
    ("inf_lr:2", 1, "ddp", "non-finite learning rate inf at step 2", "32"),
    ("nan_loss:2:0", 1, "ddp", "non-finite loss at step 2 on rank(s) [0]", "32"),
], ids=["nan-grad-ddp", "nan-grad-zero2", "nan-grad-zero2-bf16", "inf-lr", "nan-loss"])
def test_a_non_finite_update_is_refused_on_every_rank_before_it_is_applied(tmp_path, fault, devices, strategy,
                                                                          message, precision):
    result = _run(tmp_path, "nan", "--max_steps", "4", "--n_devices", str(devices), "--precision", precision,
                  "lightning.checkpoint.every_n_steps=1", f"lightning.trainer.strategy={strategy}", faults=fault)
    assert result.returncode != 0
    assert message in result.stderr and "no update was applied" in result.stderr, result.stderr[-4000:]
    assert _steps(tmp_path / "nan") == [1]  # the step that would have been poisoned is never committed
    assert [row["step"] for row in _rows(tmp_path / "nan")] == [1]


def test_a_non_finite_gradient_under_compiled_layers_names_the_eager_fallback():
    """The refusal's hint names compile_model=False only when the UNet layers are compiled and the gradients (not
    the loss or the learning rate) are what failed."""
    from vwm.training.guards import update_hint

    model = build_tiny()
    assert "compile_model" not in update_hint(model, gradients=True)
    model.unet.compile_layers()  # wraps each layer; nothing compiles until a layer runs
    assert "model.params.compile_model=False" in update_hint(model, gradients=True)
    assert "compile_model" not in update_hint(model, gradients=False)
    assert update_hint(model).startswith("Resume from the last checkpoint")


@pytest.mark.slow
def test_a_checkpoint_with_non_finite_ema_is_never_committed(tmp_path):
    result = _run(tmp_path, "ema", "--max_steps", "6", faults="nan_ema:4")
    assert result.returncode != 0
    assert "refusing to commit checkpoint step 6" in result.stderr and "model_ema." in result.stderr, \
        result.stderr[-4000:]
    assert _steps(tmp_path / "ema") == [3]


# -------------------------------------------------------------------------------- 5. one run per directory


@pytest.mark.slow
def test_a_second_run_in_a_busy_run_directory_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    first = subprocess.Popen(_cmd(tmp_path, "busy", "--max_steps", "1000", "lightning.checkpoint.every_n_steps=2"),
                             env=clean_subprocess_env(), cwd=str(tmp_path), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _steps(tmp_path / "busy"):
            assert first.poll() is None
            time.sleep(0.5)
        second = _run(tmp_path, "busy", "--resume", "auto", "--max_steps", "1000", timeout=180)
        assert second.returncode != 0
        assert f"is in use by another training process (pid {first.pid}" in second.stderr, second.stderr[-3000:]
        assert first.poll() is None  # the first run is untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    last = _steps(tmp_path / "busy")[-1]
    third = _ok(_run(tmp_path, "busy", "--resume", "auto", "--max_steps", str(last + 1)))
    assert f"stale lock of pid {first.pid}" in third.stderr
    assert _steps(tmp_path / "busy")[-1] == last + 1


# --------------------------------------------------------------------------------------------- 6. bit rot


def _damage(path: str, where: str) -> None:
    """Same-size damage: a byte flipped inside the largest tensor record, or the zip's first header zeroed."""
    if where == "zip-header":
        offset = 0
    else:
        with zipfile.ZipFile(path) as z:
            info = max(z.infolist(), key=lambda i: i.file_size)
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]) if where != "zip-header" else b"\0\0\0\0")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["tensor-data", "zip-header"])
def test_a_damaged_newest_checkpoint_is_refused_and_resume_falls_back_to_the_previous_one(full6, tmp_path, where,
                                                                                         capsys):
    run = tmp_path / "rot"
    shutil.copytree(full6, run)
    ckpt = run / "checkpoints" / "step-000000006" / "lightning.ckpt"
    size = ckpt.stat().st_size
    _damage(str(ckpt), where)
    assert ckpt.stat().st_size == size
    assert export_main([str(ckpt.parent), str(tmp_path / "o.safetensors")]) == 2
    assert "lightning.ckpt: content does not match its checksum" in capsys.readouterr().err
    result = _ok(_run(tmp_path, "rot", "--resume", "auto", "--max_steps", "6"))
    assert "step-000000006: file lightning.ckpt: content does not match its checksum" in result.stderr
    assert "resuming from step-000000003" in result.stderr
    assert _losses(run) == _losses(full6)
    assert _steps(run) == [3, 6]


# ------------------------------------------------------------------------------ 7. partial phase families


PHASE2 = ("model.params.network_config.params.add_lora=true",)


@pytest.mark.parametrize("family", ["action_control", "cond_time_stack_embed", "lora"])
def test_a_phase_family_may_be_missing_only_as_a_whole(family):
    from vwm.checkpoint import family_of

    source = {k: v for k, v in build_tiny(*PHASE2).state_dict().items() if not k.startswith("model_ema.")}
    members = sorted(k for k in source if family_of(k) == family)
    assert len(members) > 1
    whole = {k: v for k, v in source.items() if family_of(k) != family}
    assert family in load_weights(build_tiny(*PHASE2), whole).initialised
    partial = {k: v for k, v in source.items() if k != members[0]}
    with pytest.raises(CheckpointError, match=rf"has {len(members) - 1} of the {len(members)} {family} tensors.*"
                                              rf"{members[0]}"):
        load_weights(build_tiny(*PHASE2), partial)


def test_orphan_ema_shadows_are_refused_alike_by_finetune_and_export(tmp_path, capsys):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_tiny().state_dict().items()}
    state["model_ema.diffusion_modelnosuchlayerweight"] = torch.zeros(3)
    path = str(tmp_path / "orphan.safetensors")
    save_file(state, path)
    message = "EMA shadows without a matching weight: model_ema.diffusion_modelnosuchlayerweight"
    with pytest.raises(CheckpointError, match=message):
        load_weights(build_tiny(), path)
    for flag in ("--ema", "--no-ema"):
        assert export_main([path, str(tmp_path / "o.safetensors"), "--config", TINY_MODEL, flag]) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- 9. bookkeeping


@pytest.mark.slow
def test_metrics_keep_every_step_across_a_kill_after_a_commit_and_a_torn_last_line(full6, tmp_path):
    killed = _run(tmp_path, "kill", "--max_steps", "6", faults="kill_after_commit:3")
    assert killed.returncode == -signal.SIGKILL
    metrics = tmp_path / "kill" / "metrics.jsonl"
    assert [row["step"] for row in _rows(tmp_path / "kill")] == [1, 2, 3]
    with open(metrics, "a") as f:
        f.write('{"step": 4, "lo')  # a row torn by a kill in the middle of its write
    _ok(_run(tmp_path, "kill", "--resume", "auto", "--max_steps", "6"))
    assert _losses(tmp_path / "kill") == _losses(full6)


@pytest.mark.slow
def test_a_fresh_restart_after_a_crash_before_the_first_checkpoint_drops_the_dead_attempts_rows(full6, tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    _ok(_run(tmp_path, "fresh", "--max_steps", "3"))
    assert _losses(run) == _losses(full6)[:3]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_full_disk_under_zero2_is_named_and_the_previous_checkpoint_stays_intact(tmp_path):
    from vwm.training.checkpointing import read_manifest

    result = _run(tmp_path, "full_disk", "--max_steps", "6", "--n_devices", "2", ZERO2,
                  "lightning.checkpoint.every_n_steps=2", faults="enospc:4")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no space left on the device holding" in out and "checkpoints" in out, out[-4000:]
    assert "step 4" in out and "step-000000002 is intact" in out
    assert "unexpected pos" not in out and "basic_ios" not in out
    assert _steps(tmp_path / "full_disk") == [2]
    read_manifest(str(tmp_path / "full_disk" / "checkpoints" / "step-000000002"), checksums=True)
