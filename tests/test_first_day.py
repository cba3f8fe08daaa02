"""A Vista user's first day (issue #14): what a launch starts from, errors before the expensive part in one style,
the reference's flags, progress and the closing summary, loggers, run names, file permissions, the latent cache,
quiet output, the `vwm` command and an installed package. Each test fails on the behaviour the issue reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import clean_subprocess_env
from helpers import REPO, build_tiny, tiny_config

TRAIN = os.path.join(REPO, "train.py")
TINY = os.path.join(REPO, "configs", "tiny", "train.yaml")
PHASE1 = os.path.join(REPO, "configs", "training", "vista_phase1.yaml")
TOY_DATA = os.path.join(REPO, "configs", "data", "toyworld.yaml")
CSV_LOGGER = "lightning.logger={target: pytorch_lightning.loggers.CSVLogger, params: {name: csv}}"


def _dry(capsys, *argv: str) -> tuple[int, str, str]:
    from vwm.cli.train import main

    code = main(["--dry-run", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str, prog: str) -> str:
    lines = [line for line in err.strip().splitlines() if not re.match(r"^\d{4}-\d\d-\d\d .* (INFO|WARNING) ", line)]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------ 1. starting weights


def test_no_weights_is_refused_and_the_source_is_said_loudly(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--base", PHASE1, TOY_DATA, "--logdir", str(tmp_path)]
    code, _, err = _dry(capsys, *base)
    assert code == 2
    line = _one_line_error(err, "train.py")
    assert "no starting weights" in line and "ckpts/svd_xt.safetensors" in line and "--from-scratch" in line
    assert "huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt" in line
    code, out, _ = _dry(capsys, *base, "--from-scratch")
    assert code == 0 and "# weights: RANDOM initialisation" in out
    # The reference's default, when present in the working directory, is used and named.
    from safetensors.torch import save_file

    (tmp_path / "ckpts").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "ckpts" / "svd_xt.safetensors"))  # embeds no config, like SVD's
    code, out, _ = _dry(capsys, *base)
    assert code == 0
    assert "# weights: initialised from ckpts/svd_xt.safetensors (no --finetune given: the reference's default" in out
    assert "embeds no config: its tensors are checked when a run loads it" in out
    (tmp_path / "ckpts" / "svd_xt.safetensors").write_bytes(b"not safetensors")
    code, _, err = _dry(capsys, *base)
    assert code == 2 and "not a readable safetensors file" in err
    code, _, err = _dry(capsys, *base, "--from-scratch", "--finetune", "ckpts/svd_xt.safetensors")
    assert code == 2 and "choose the starting weights or random ones" in err


def test_a_real_run_loads_the_default_weights_and_logs_it(tmp_path):
    """The reference's phase-1 command without --finetune starts from ckpts/svd_xt.safetensors."""
    from safetensors.torch import save_file

    model = build_tiny(seed=5)
    (tmp_path / "ckpts").mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    save_file(state, str(tmp_path / "ckpts" / "svd_xt.safetensors"))
    result = subprocess.run([sys.executable, TRAIN, "--base", TINY, "from_scratch=false", "--logdir", str(tmp_path),
                             "--accelerator", "cpu", "--max_steps", "1", "lightning.trainer.logger=false"],
                            cwd=tmp_path, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights: initialised from ckpts/svd_xt.safetensors" in result.stderr


# ------------------------------------------------------------------ 3. config values applied, not ignored


def test_precision_devices_and_logger_in_the_config_are_applied(tmp_path, capsys):
    base = ["--base", TINY, "--logdir", str(tmp_path)]
    code, out, _ = _dry(capsys, *base, "lightning.trainer.precision=16-mixed", "lightning.trainer.devices=0,1",
                        "lightning.trainer.num_nodes=2", "lightning.trainer.logger=false")
    assert code == 0
    assert "4 process(es) = 2 node(s) [lightning.trainer.num_nodes] x 2 device(s) [lightning.trainer.devices]" in out
    assert "precision 16-mixed [lightning.trainer.precision]" in out
    assert "# loggers: none (lightning.trainer.logger=false)" in out
    code, out, _ = _dry(capsys, *base, "lightning.trainer.precision=16-mixed", "--precision", "32-true",
                        "--n_devices", "3")
    assert "precision 32-true [--precision]" in out and "3 device(s) [--n_devices]" in out
    code, out, _ = _dry(capsys, *base, CSV_LOGGER)
    assert "# loggers: logger (CSVLogger) + metrics.jsonl" in out


# ------------------------------------------------------------- 4. errors before the model is built, in --dry-run


@pytest.mark.parametrize("override, message", [
    ("data.params.subsets.ToyWorldSubset.length=0", r"data\.params\.subsets\[0\] \(ToyWorldSubset\): .*"),
    ("data.params.subsets=[NuScenes]", r"data\.params\.subsets\[0\] \(NuScenes\): data_root='data/nuscenes' is not "
                                       r"an existing directory; set it with data\.params\.subsets\.NuScenes\."
                                       r"data_root=PATH"),
    ("lightning.trainer.max_epoch=3", r"lightning\.trainer\.max_epoch: unknown key \(did you mean 'max_epochs'\?\)"),
    ("data.params.target_height=300", r"data\.params\.target_height=300 is invalid; allowed: a positive multiple "
                                      r"of 64"),
    ("data.params.probs=[1, 2]", r"data\.params \(vwm\.data\.datamodule\.VideoDataModule\): probs=\[1, 2\] must be 1 "
                                 r"non-negative numbers"),
])
def test_dry_run_fails_on_what_a_run_fails_on(tmp_path, capsys, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _dry(capsys, "--base", TINY, "--logdir", str(tmp_path), override)
    assert code == 2 and re.search(message, _one_line_error(err, "train.py")), err


def test_a_data_mistake_fails_before_the_model_is_built(tmp_path):
    """The run stops at the data check: the conditioner (built first with the model) never logs."""
    result = subprocess.run([sys.executable, TRAIN, "--base", TINY, "--logdir", str(tmp_path), "--accelerator", "cpu",
                             "data.params.subsets=[{target: vwm.data.opendv.OpenDVSubset, "
                             "params: {data_root: nowhere}}]"],
                            cwd=tmp_path, env=clean_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "data.params.subsets[0] (YouTube): data_root='nowhere' is not an existing directory" in result.stderr
    assert "Embedder 0" not in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- 5. one error style everywhere


def test_every_entry_point_reports_user_errors_in_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    from vwm.cli.export import main as export_main
    from vwm.cli.sample import main as sample_main
    from vwm.cli.train import main as train_main
    from vwm.data.latents import main as latents_main
    from vwm.data.nuscenes import main as nuscenes_main
    from vwm.data.opendv import main as opendv_main

    (tmp_path / "nusc" / "v1.0-mini").mkdir(parents=True)
    cases = [
        (train_main, "train.py", ["--base", "nope.yaml"], "nope.yaml"),
        (sample_main, "sample.py", ["--ckpt", "nope.safetensors"], "--ckpt='nope.safetensors' does not exist"),
        (export_main, "bin_to_st.py", ["nope.bin", str(tmp_path / "o.safetensors")], "nope.bin"),
        (nuscenes_main, "python -m vwm.data.nuscenes", ["build", "--data_root", str(tmp_path / "nusc"), "--out",
                                                       str(tmp_path / "a.json")], "present: v1.0-mini"),
        (opendv_main, "python -m vwm.data.opendv", ["index", "--data_root", str(tmp_path / "nowhere"), "--out",
                                                   str(tmp_path / "b.json")], "is not an existing directory"),
        (latents_main, "python -m vwm.data.latents", ["build", "--config", "nope.yaml", "--out", str(tmp_path / "c")],
         "nope.yaml"),
    ]
    for main, prog, argv, text in cases:
        assert main(argv) == 2, prog
        assert text in _one_line_error(capsys.readouterr().err, prog)
    monkeypatch.setenv("VWM_DEBUG", "1")  # the traceback on demand
    with pytest.raises(FileNotFoundError):
        sample_main(["--ckpt", "nope.safetensors"])
    monkeypatch.delenv("VWM_DEBUG")
    with pytest.raises(FileNotFoundError):
        train_main(["--base", "nope.yaml", "--debug"])


# ------------------------------------------------------------- 6, 7. overrides anywhere, the reference's flags


def test_overrides_anywhere_after_base_and_the_references_flags():
    from vwm.cli.train import parse

    opts = parse(["--base", TINY, "data.params.batch_size=1", TOY_DATA, "--seed", "3", "model.params.num_frames=5"])
    assert opts.base == [TINY, TOY_DATA] and opts.seed == 3
    assert opts.overrides == ["data.params.batch_size=1", "model.params.num_frames=5"]
    opts = parse(["--base", TINY, "--resume_from_checkpoint", "logs/x/checkpoints/step-000000010", "--no_date",
                  "-f", "_try2", "-t", "True", "--max_epochs", "3", "--accumulate_grad_batches=2"])
    assert opts.resume == "logs/x/checkpoints/step-000000010" and opts.name == "tiny-train_try2"
    assert opts.overrides == ["lightning.trainer.max_epochs=3", "lightning.trainer.accumulate_grad_batches=2"]
    assert parse(["--base", TINY, "-r"]).resume == "auto"
    opts = parse(["--base", TINY, "-r", "data.params.batch_size=1"])
    assert opts.resume == "auto" and opts.overrides == ["data.params.batch_size=1"]
    assert parse(["--base", TINY, "--resume", "auto"]).resume == "auto"
    for argv, text in [(["-p", "vista"], "name the run with --name"), (["--gpus", "8"], "--n_devices"),
                       (["-t", "False"], "--dry-run"), (["--bogus", "1"], "unrecognised arguments: --bogus")]:
        with pytest.raises(ValueError, match=re.escape(text)):
            parse(["--base", TINY, *argv])


def test_sample_py_takes_the_references_defaults_and_flags(tmp_path, capsys, monkeypatch):
    from vwm.cli.sample import DEFAULT_CKPT, main

    monkeypatch.chdir(tmp_path)
    assert DEFAULT_CKPT == "ckpts/vista.safetensors"
    assert main(["--dataset", "TOY", "--rand_gen"]) == 2  # the default --ckpt is looked for
    line = _one_line_error(capsys.readouterr().err, "sample.py")
    assert "--ckpt='ckpts/vista.safetensors' does not exist" in line and "huggingface.co/OpenDriveLab" in line
    assert main(["--version", "vwm"]) == 2
    assert "--version is not a vwm flag" in capsys.readouterr().err


# ------------------------------------------------------------- 9, 10, 14. a run: progress, summary, quiet, logger


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Three steps, then a resume to five, through train.py with a CSV logger (output and run directory)."""
    tmp = tmp_path_factory.mktemp("run")

    def launch(steps, *extra):
        cmd = [sys.executable, TRAIN, "--base", TINY, "--logdir", str(tmp), "--accelerator", "cpu", "--max_steps",
               str(steps), "lightning.trainer.precision=32-true", CSV_LOGGER, *extra]
        result = subprocess.run(cmd, cwd=tmp, env=clean_subprocess_env(), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    first = launch(3)
    resumed = launch(5, "--resume", "auto")
    return tmp / "tiny-train", first, resumed


def test_progress_counts_optimizer_steps_to_the_end_across_a_resume(tiny_run):
    _, first, resumed = tiny_run
    assert re.search(r"train: 100%.*\| 3/3 steps \[.*clips/s", first.stderr), first.stderr[-2000:]
    assert re.search(r"train:  60%.*\| 3/5 steps", resumed.stderr) or " 3/5 steps" in resumed.stderr
    assert re.search(r"\| 5/5 steps", resumed.stderr)
    assert "Epoch 0" not in first.stderr  # not Lightning's per-epoch batch counter


def test_the_run_ends_with_a_summary_and_a_loss_curve(tiny_run):
    run_dir, first, resumed = tiny_run
    assert "== training finished: step 3 (3 steps this run, from step 0)" in first.stdout
    assert "== training finished: step 5 (2 steps this run, from step 3)" in resumed.stdout
    out = resumed.stdout
    assert re.search(r"final loss \d\.\d+", out)
    assert f"checkpoint     {run_dir}/checkpoints/step-000000005" in out
    assert "next           python bin_to_st.py" in out and "step-000000005 ckpts/tiny-train.safetensors" in out
    assert (run_dir / "loss.png").stat().st_size > 1000


def test_a_configured_logger_replaces_tensorboard(tiny_run):
    run_dir, _, _ = tiny_run
    assert list((run_dir / "csv").rglob("metrics.csv")) and not (run_dir / "tensorboard").exists()
    assert "weights: RANDOM initialisation" in tiny_run[1].stderr
    assert "precision 32-true [lightning.trainer.precision]" in tiny_run[1].stderr


def test_output_is_quiet_by_default(tiny_run):
    err = tiny_run[1].stderr
    for noise in ("litlogger", "LitLogger", "eval mode", "is deprecated", "Tip:", "Modules in train mode"):
        assert noise not in err, noise


# ----------------------------------------------------------------------------------------- 11. run names


def test_default_run_names_are_unique_per_config_path(tmp_path, capsys):
    from vwm.training.preflight import default_run_name

    a, b = tmp_path / "exp_a" / "train.yaml", tmp_path / "exp_b" / "train.yaml"
    assert default_run_name([str(a)]) != default_run_name([str(b)])
    assert default_run_name([PHASE1]) == "training-vista_phase1"
    assert default_run_name([PHASE1, TOY_DATA]) == "training-vista_phase1+data-toyworld"
    code, out, _ = _dry(capsys, "--base", TINY, "--logdir", str(tmp_path))
    assert f"# run directory: {tmp_path}/tiny-train" in out


# ---------------------------------------------------------------------------------- 12. file permissions


def test_exports_honour_the_umask(tiny_run, tmp_path):
    from vwm.cli.export import main

    run_dir = tiny_run[0]
    old = os.umask(0o022)
    try:
        assert main([str(run_dir / "checkpoints" / "step-000000005"), str(tmp_path / "x.safetensors")]) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "x.safetensors").st_mode & 0o777) == oct(0o644)


# ---------------------------------------------------------------------------------------- 13. latent cache


def test_the_latent_cache_encodes_each_rebalanced_clip_once(tmp_path, monkeypatch):
    from fixtures_data import nuscenes_entry, write_frame_folder
    from omegaconf import OmegaConf

    import vwm.data.latents as latents
    from vwm.data.latents import LatentCacheSubset, build_cache

    write_frame_folder(str(tmp_path / "nusc"), "samples/CAM_FRONT", 12)
    frames = [f"samples/CAM_FRONT/{i:09d}.jpg" for i in range(12)]
    annos = tmp_path / "annos.json"
    annos.write_text(json.dumps([nuscenes_entry(frames[:5], cmd=0), nuscenes_entry(frames[5:10], cmd=3)]))
    cfg = OmegaConf.merge(tiny_config(), {"data": {"target": "vwm.data.datamodule.VideoDataModule", "params": {
        "batch_size": 1, "target_height": 64, "target_width": 64, "num_frames": 5,
        "subsets": [{"target": "vwm.data.nuscenes.NuScenesSubset",
                     "params": {"data_root": str(tmp_path / "nusc"), "anno_file": str(annos)}}]}}})
    calls = []
    real = latents.encode_moments
    monkeypatch.setattr(latents, "encode_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    index = build_cache(cfg, str(tmp_path / "cache"))
    # turn x5, then complete (speed, angle, goal) x2: 10 + 2 occurrences of 2 clips
    assert index["num_clips"] == 12 and index["num_encoded"] == 2 and len(calls) == 2
    subset = LatentCacheSubset(5, 64, 64, cache_dir=str(tmp_path / "cache"))
    assert len(subset) == 12
    first = subset.load_clip(0).moments
    assert all(torch.equal(subset.load_clip(i).moments, first) for i in range(12)
               if index["clips"]["stored"][i] == 0)


# ----------------------------------------------------------------------------- 15. one command, packaging


def test_the_vwm_command_dispatches_to_every_tool(tmp_path, capsys):
    from vwm.cli.main import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("train", "sample", "reward", "export", "eval", "data", "configs"):
        assert f"  {command} " in text
    assert main(["train", "--base", TINY, "--dry-run", "--logdir", str(tmp_path)]) == 0
    assert "# parameters" in capsys.readouterr().out
    assert main(["data", "opendv", "index", "--data_root", str(tmp_path / "x"), "--out", "y.json"]) == 2
    assert _one_line_error(capsys.readouterr().err, "vwm data opendv")
    assert main(["configs"]) == 0 and "configs/training/vista_phase1.yaml" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "vwm", "--version"], cwd=REPO, env=clean_subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("vwm ")


@pytest.mark.slow
def test_an_installed_wheel_finds_its_configs(tmp_path):
    import shutil

    source, wheels, prefix = tmp_path / "src", tmp_path / "wheels", tmp_path / "prefix"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", ".venv", ".whl", "logs", "outputs", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, timeout=300, env=clean_subprocess_env())
    wheel = next(wheels.glob("vwm-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--prefix", str(prefix), str(wheel)],
                   check=True, timeout=300, env=clean_subprocess_env())
    site = next(prefix.rglob("vwm/__init__.py")).parent.parent
    code = ("import vwm, sys; from vwm.config import load_config; "
            "assert vwm.__file__.startswith(sys.argv[1]), vwm.__file__; "
            "cfg = load_config('configs/training/vista_phase1.yaml'); print(cfg.data.params.target_height)")
    result = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                            env=clean_subprocess_env(PYTHONPATH=str(site)), timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "576", result.stderr[-2000:]
    assert (prefix / "share" / "vwm" / "configs" / "training" / "vista_phase1.yaml").is_file()
    assert (prefix / "bin" / "vwm").is_file()


def test_pyproject_ships_every_config_folder():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        data_files = tomllib.load(f)["tool"]["setuptools"]["data-files"]
    folders = sorted(d for d in os.listdir(os.path.join(REPO, "configs"))
                     if os.path.isdir(os.path.join(REPO, "configs", d)))
    assert sorted(k.rsplit("/", 1)[-1] for k in data_files) == folders
