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
    assert row["resolution"] == "5x64x64" and row["compile"] is False and row["zero_init"] is False
    assert "run_backward" in host.read_text()  # the profile covers the timed steps' backward passes
    regions = row["regions_ms"]  # the step's regions, timed inside the real Lightning step
    assert {"conditioner", "encode", "unet_forward", "backward", "ema"} <= set(regions)
    assert all(v >= 0 for v in regions.values()) and regions["backward"] > 0 and regions["unet_forward"] > 0
    # two timed steps: the medians are means, so the regions add up to the mean step (less the timer's own edges)
    assert 0.7 * row["step_s_median"] * 1e3 <= sum(regions.values()) <= 1.02 * row["step_s_median"] * 1e3


@pytest.mark.slow
def test_train_step_bench_ab_of_deepspeeds_stock_step_under_zero2_bf16(tmp_path):
    """`--deepspeed-stock` (bench/gpu_measure.sh zero_step) runs DeepSpeed's own bf16 step (overflow check on,
    foreach AdamW) on the same real ZeRO-2 path; without it vwm's step runs, and both time the DeepSpeed step."""
    rows = {}
    for stock in (True, False):
        cmd = [sys.executable, os.path.join(REPO, "bench", "train_step.py"), "--config",
               os.path.join(REPO, "configs", "tiny", "train.yaml"), "--accelerator", "cpu", "--strategy",
               "deepspeed_stage_2", "--precision", "bf16-mixed", "--height", "64", "--width", "64", "--warmup", "1",
               "--steps", "1", *(["--deepspeed-stock"] if stock else [])]
        out = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        row = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        assert row["losses_finite"] and row["regions_ms"]["deepspeed_step"] > 0
        rows[stock] = row
    assert (rows[True]["deepspeed_step"], rows[True]["bf16_check_grad_overflow"], rows[True]["adam_form"]) == (
        "stock", True, "foreach")
    # vwm's: DeepSpeed's check off (vwm's guard checks); AdamW fused on CUDA only, torch's default on this CPU
    assert (rows[False]["deepspeed_step"], rows[False]["bf16_check_grad_overflow"], rows[False]["adam_form"]) == (
        "vwm", False, "default")


def test_regions_bench_times_every_region_on_the_tiny_model(tmp_path):
    """bench/regions.py (the per-region breakdown of docs/performance.md) runs each region's real code."""
    cmd = [sys.executable, os.path.join(REPO, "bench", "regions.py"), "--config",
           os.path.join(REPO, "configs", "tiny", "train.yaml"), "--device", "cpu", "--height", "64", "--width",
           "64", "--reps", "1", "--vae-variants", "nchw", "nchw_bmm", "compiled_fusedgn", "--sdpa", "default"]
    out = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    regions = [r["region"] for r in rows]
    assert regions == ["conditioner", "vae_encode", "vae_encode", "vae_encode", "unet_fwd", "loss_fwd_bwd", "optimizer", "ema"]
    assert all(r["s_median"] > 0 for r in rows) and rows[-2]["n_params"] > 0
    assert [r["variant"] for r in rows if r["region"] == "vae_encode"] == ["nchw", "nchw_bmm", "compiled_fusedgn"]


def test_loader_bench_reads_jpeg_folders_and_mp4s_through_the_real_datamodule(tmp_path):
    """bench/loader.py writes OpenDV-format data (JPEG frame folders, H.264 mp4s) and times the real loader."""
    cmd = [sys.executable, os.path.join(REPO, "bench", "loader.py"), "--data", str(tmp_path / "data"),
           "--workers", "0", "1", "--height", "64", "--width", "64", "--frames", "5", "--source-width", "128",
           "--source-height", "72", "--sources", "1", "--source-frames", "12", "--warmup", "1", "--batches", "2"]
    out = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["format"], r["workers"]) for r in rows] == [("jpeg", 0), ("jpeg", 1), ("mp4", 0), ("mp4", 1)]
    assert all(r["clips_per_s"] > 0 and r["clip"] == "5x64x64" and r["frames_dtype"] == "uint8" for r in rows)
    assert len(os.listdir(tmp_path / "data" / "frames" / "seq000")) == 12


@pytest.mark.slow
@pytest.mark.distributed
def test_scaling_bench_runs_train_py_under_torchrun_and_reports_efficiency(tmp_path):
    """bench/scaling.py launches the real train.py under torchrun for each process count (gloo on CPU here) on
    random clips and reports the last throughput window and the efficiency against the first count."""
    cmd = [sys.executable, os.path.join(REPO, "bench", "scaling.py"), "--config",
           os.path.join(REPO, "configs", "tiny", "train.yaml"), "--height", "64", "--width", "64", "--gpus", "1",
           "2", "--cpu", "--workers", "0", "--steps", "21", "--work", str(tmp_path / "runs")]
    out = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["gpus"] for r in rows] == [1, 2] and all("error" not in r for r in rows), rows
    assert all(r["steps"] == 21 and r["clips_per_s"] > 0 and r["step_s"] > 0 for r in rows)
    assert rows[0]["efficiency"] == 1.0 and rows[1]["efficiency"] > 0
    for n in (1, 2):
        assert (tmp_path / "runs" / f"scale-n{n}" / "metrics.jsonl").is_file()


def test_demo_probe_sampling_variants_set_further_rollout_fields():
    """--sampling "steps:cfg:sigma_min:sigma_max[:field=value...]": numbers, booleans and names after the four."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_probe", os.path.join(REPO, "bench", "demo_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    plain = probe.parse_sampling("12:3:4:80")
    assert (plain.n_steps, plain.cfg_scale, plain.sigma_min, plain.sigma_max) == (12, 3.0, 4.0, 80.0)
    assert (plain.guidance_sigma_min, plain.final_antithetic, plain.sampler) == (0.0, False, "euler")
    more = probe.parse_sampling("12:3:4:80:guidance_sigma_min=6.5:final_antithetic=true:sampler=heun")
    assert (more.guidance_sigma_min, more.final_antithetic, more.sampler) == (6.5, True, "heun")
    for bad in ("12:3:4:80:nosuch=1", "12:3:4:80:cfg_scale=2", "12:3:4:80:guidance_sigma_min"):
        with pytest.raises(ValueError, match="is not field=value of a RolloutSettings field"):
            probe.parse_sampling(bad)


@pytest.mark.slow
def test_demo_probe_trains_saves_and_reloads_the_model_it_measures(tmp_path):
    """bench/demo_probe.py (the demo-tuning measurements of docs/toyworld.md): a 2-step run reports the loss, the
    action use and the rollout measures, saves its model before evaluating, and a reload measures the same."""
    probe = os.path.join(REPO, "bench", "demo_probe.py")
    model = tmp_path / "m.pt"
    common = ["--indices", "0", "--n_steps", "2", "--sampling", "2:3:4:80"]
    run = subprocess.run([sys.executable, probe, "--steps", "2", "--eval_every", "2", "--save_model", str(model),
                          *common], env=clean_subprocess_env(), capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert rows[0]["step"] == 2 and set(rows[0]["action_use"]) == {"0.3", "1", "3"}
    assert 0 < rows[0]["steering"]["psnr_db_mean"] < 60 and model.is_file()
    again = subprocess.run([sys.executable, probe, "--load_model", str(model), *common], env=clean_subprocess_env(),
                           capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    reloaded = [json.loads(line) for line in again.stdout.splitlines()]
    assert reloaded[-1]["steering"]["psnr_db_mean"] == rows[-1]["steering"]["psnr_db_mean"]


def test_gpu_measure_script_uses_only_flags_its_tools_accept():
    """bench/gpu_measure.sh (the open GPU measurements of issues #13 and #15) cannot run here; every flag it passes
    to a bench tool must be one the tool's --help lists, and every config it names must exist."""
    import re

    with open(os.path.join(REPO, "bench", "gpu_measure.sh")) as f:
        text = f.read().replace("\\\n", " ")
    calls = re.findall(r'"\$PY" (bench/\w+\.py)([^|]*?)2>>', text)
    assert {tool for tool, _ in calls} == {"bench/train_step.py", "bench/sample.py", "bench/geglu.py",
                                          "bench/evaluate.py", "bench/regions.py", "bench/compiled_grads.py",
                                          "bench/groupnorm.py"}
    procs = {tool: subprocess.Popen([sys.executable, os.path.join(REPO, tool), "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=clean_subprocess_env())
             for tool in dict.fromkeys(tool for tool, _ in calls)}  # all at once: each --help is mostly imports
    helps = {}
    for tool, proc in procs.items():
        helps[tool], err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{tool} --help failed:\n{err[-3000:]}"
    for tool, args in calls:
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", args):
            assert re.search(re.escape(flag) + r"(?![\w-])", helps[tool]), f"{tool} has no {flag}"
        for config in re.findall(r"configs/[\w/]+\.yaml", args):
            assert os.path.exists(os.path.join(REPO, config)), config


def test_sample_bench_randomises_zero_initialised_weights_so_modes_can_differ():
    """bench/sample.py compares sampling modes (FP8 against bf16) by PSNR on random weights; a freshly built UNet
    outputs exactly zero (zero-initialised output layers), which made every mode's video identical (PSNR inf on
    the H100, 2026-12-06). After randomize_zero_weights the output depends on the weights."""
    import importlib.util

    import torch
    from helpers import build_tiny, make_batch

    spec = importlib.util.spec_from_file_location("bench_sample", os.path.join(REPO, "bench", "sample.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    batch = make_batch(b=1)

    def denoised(model):
        torch.manual_seed(1)
        cond, _ = model.get_conditioning(batch)
        z = torch.randn(1, model.num_frames, 4, 8, 8)
        with torch.no_grad():
            return model.denoiser(model.model, z, torch.full((1,), 2.0), cond, torch.zeros(1, model.num_frames))

    fresh = [build_tiny(nonzero=False, seed=s) for s in (0, 1)]
    # different random weights, the same output: the UNet contributes nothing, only the skip path c_skip * x
    torch.testing.assert_close(denoised(fresh[0]), denoised(fresh[1]), rtol=0, atol=0)
    assert bench.randomize_zero_weights(fresh[0].unet) > 0
    assert bench.randomize_zero_weights(fresh[1].unet, seed=5) > 0
    a, b = denoised(fresh[0]), denoised(fresh[1])
    assert torch.isfinite(a).all() and (a - b).abs().mean() > 1e-3
    assert bench.randomize_zero_weights(fresh[0].unet) == 0  # nothing left at zero


def test_compiled_grads_bench_compares_a_layer_and_bisects_the_compiler_on_a_wrong_one():
    """bench/compiled_grads.py on the tiny config: Inductor's CPU code matches the eager layer (output and
    gradients within fp32 rounding); with a tolerance nothing can meet, the layer counts as wrong and the compiler
    bisection runs (mix-order reduction switched, AOTAutograd's graphs eagerly, Inductor's decompositions eagerly,
    Inductor in fp32)."""
    import json

    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "compiled_grads.py"), "--config",
         os.path.join(REPO, "configs", "tiny", "train.yaml"), "--height", "64", "--width", "64", "--device", "cpu",
         "--modes", "plain", "--only", "VideoResBlock(5, 32, 8, 8)", "--tolerance", "1e-30"],
        capture_output=True, text=True, env=clean_subprocess_env(), timeout=600, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    checks = [r for r in rows if r["check"] == "inductor"]
    assert len(checks) == 1 and checks[0]["layer"] == "input_blocks.1.0", rows
    assert checks[0]["grad_x"] < 1e-5 and checks[0]["grad_weights"] < 1e-5 and checks[0]["out"] < 1e-5
    assert checks[0]["grad_x_norm"] > 0 and not checks[0]["nonfinite"]
    bisect = [r for r in rows if r["check"] == "bisect"]
    assert [r["backend"] for r in bisect] == ["inductor", "aot_eager", "aot_eager_decomp_partition", "inductor"], rows
    assert all(r["grad_weights"] < 1e-5 for r in bisect)
    # the checks ran with vwm's Inductor options; the first bisection step switches mix-order reduction back on
    assert checks[0]["inductor_options"]["triton.mix_order_reduction"] is False
    assert bisect[0]["variant_options"]["triton.mix_order_reduction"] is True
    assert bisect[-1]["dtype"] == "float32" and bisect[-1]["variant_options"]["triton.mix_order_reduction"] is False


def test_compiled_grads_sweep_compiles_the_layer_with_each_option_set():
    """`--sweep`: the layer compiled with each of SWEEP's Inductor option sets over vwm's, each judged against
    eager (on the CPU every set computes the same gradients)."""
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "compiled_grads.py"), "--config",
         os.path.join(REPO, "configs", "tiny", "train.yaml"), "--height", "64", "--width", "64", "--device", "cpu",
         "--modes", "plain", "--only", "VideoResBlock(5, 32, 8, 8)", "--sweep"],
        capture_output=True, text=True, env=clean_subprocess_env(), timeout=600, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"sweep"' in line]
    assert len(rows) == 5 and rows[0]["variant"] == {} and rows[-1]["variant"]["shape_padding"] is True, rows
    assert all(r["ok"] and r["grad_weights"] < 1e-5 for r in rows), rows
    assert rows[0]["inductor_options"]["comprehensive_padding"] is False
