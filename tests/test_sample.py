"""sample.py end to end on the tiny model (CPU): every action mode, long rollouts, outputs, reproducibility,
custom actions reaching the network, the reward, and each user-facing error (DESIGN.md §5 layers 4-5)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from conftest import clean_subprocess_env
from helpers import REPO, TINY_MODEL, build_tiny, tiny_config
from PIL import Image
from safetensors.torch import save_file

from vwm import rollout as ro
from vwm.actions import ACTION_FEATURES, ACTION_KEYS
from vwm.cli.sample import main
from vwm.config import to_container
from vwm.models.embeddings import timestep_embedding
from vwm.models.video_unet import VideoUNet

FAST = ["--height", "64", "--width", "64", "--n_steps", "2"]
CLIP_WIDTH = 64  # tiny CLIP embedding; the 2432 action columns follow
_ends = np.cumsum([0] + [128 * ACTION_FEATURES[k] for k in ACTION_KEYS]) + CLIP_WIDTH
COLUMNS = {k: slice(int(_ends[i]), int(_ends[i + 1])) for i, k in enumerate(ACTION_KEYS)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A vwm safetensors export of the tiny model (config embedded) and the same weights without it."""
    folder = tmp_path_factory.mktemp("ckpt")
    state = {k: v.detach().clone().contiguous() for k, v in build_tiny().state_dict().items()}
    with_cfg, bare = str(folder / "tiny.safetensors"), str(folder / "bare.safetensors")
    config = json.dumps({"model": to_container(tiny_config().model)})
    save_file(state, with_cfg, metadata={"vwm_config": config})
    save_file(state, bare)
    return with_cfg, bare


@pytest.fixture
def contexts(monkeypatch):
    """Every cross-attention context the UNet receives (rows: [uc half; cond half] under CFG)."""
    seen = []
    forward = VideoUNet.forward

    def spy(self, x, c_noise, context, y=None, cond_mask=None):
        seen.append(context.detach().clone())
        return forward(self, x, c_noise, context, y, cond_mask)

    monkeypatch.setattr(VideoUNet, "forward", spy)
    return seen


def _run(ckpt_path, tmp_path, *extra, name="out"):
    save = str(tmp_path / name)
    rc = main(["--ckpt", ckpt_path, "--save", save, *FAST, *extra])
    return rc, save


def _frames(path):
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _pngs(folder):
    names = sorted(os.listdir(folder))
    return np.stack([np.asarray(Image.open(os.path.join(folder, n))) for n in names])


def _images(folder, count=2):
    os.makedirs(folder, exist_ok=True)
    image = (np.random.default_rng(0).random((90, 160, 3)) * 255).astype(np.uint8)
    for i in range(count):
        Image.fromarray(image).save(os.path.join(folder, f"start_{i}.png"))  # identical start images
    return folder


@pytest.mark.parametrize("action, shown", [
    ("free", ()), ("traj", ("trajectory",)), ("cmd", ("command",)), ("steer", ("speed", "angle")),
    ("goal", ("goal",)),
])
def test_every_action_mode_makes_a_three_round_rollout(ckpt, tmp_path, contexts, action, shown):
    rc, save = _run(ckpt[0], tmp_path, "--dataset", "TOY", "--index", "0", "--n_rounds", "3",
                    "--action", action)
    assert rc == 0
    folder = os.path.join(save, "toy_000000")
    assert len(_frames(os.path.join(folder, "generated.mp4"))) == 9  # 5 + 2 * (5 - 3)
    assert len(_frames(os.path.join(folder, "ground_truth.mp4"))) == 5
    comparison = _frames(os.path.join(folder, "comparison.mp4"))
    assert len(comparison) == 9 and comparison[0].shape[1] > 128
    record = json.load(open(os.path.join(folder, "sample.json")))
    assert record["frames"] == 9 and record["seed"] == 23 and record["actions"]["missing"] == []
    assert [sorted(r) for r in record["actions"]["rounds"]] == [sorted(shown)] * 3
    assert {"denoise_s", "decode_s", "encode_s"} <= set(record["timings_s"]) and record["peak_memory_gib"] > 0
    assert len(contexts) == 3 * 2  # 3 rounds x 2 Euler steps, one batched CFG pass each
    for ctx in contexts:
        uc, cond = ctx.chunk(2)
        assert not uc[..., CLIP_WIDTH:].any()
        for key, cols in COLUMNS.items():
            assert bool(cond[..., cols].any()) == (key in shown), key
    summary = json.load(open(os.path.join(save, "run.json")))
    assert [o["name"] for o in summary["outputs"]] == ["toy_000000"]


def test_a_missing_ground_truth_action_is_reported_and_absent(ckpt, tmp_path, contexts, caplog):
    rc, save = _run(ckpt[0], tmp_path, "--dataset", "TOY", "--index", "2", "--action", "goal")
    assert rc == 0  # toy clip 2 stops: its goal point is behind the camera, so it has no goal action
    record = json.load(open(os.path.join(save, "toy_000002", "sample.json")))
    assert record["actions"]["missing"] == ["goal"] and record["actions"]["rounds"] == [{}]
    assert "toy_000002: the clip has no goal" in caplog.text
    assert all(not ctx[..., CLIP_WIDTH:].any() for ctx in contexts)


def test_free_action_zeroes_every_action_embedding(ckpt, tmp_path, contexts):
    assert _run(ckpt[0], tmp_path, "--dataset", "TOY", "--index", "0", "--n_rounds", "2")[0] == 0
    assert contexts and all(not ctx[..., CLIP_WIDTH:].any() for ctx in contexts)
    assert all(ctx[..., :CLIP_WIDTH].any() for ctx in contexts)  # the CLIP token is there (cond half)


def test_custom_actions_change_what_the_network_receives(ckpt, tmp_path, contexts):
    plan = tmp_path / "turns.json"
    plan.write_text(json.dumps([{"command": "left", "speed": [10, 10, 10, 10]}, {"command": "right"}]))
    rc, save = _run(ckpt[0], tmp_path, "--dataset", "TOY", "--index", "0", "--n_rounds", "2",
                    "--actions_json", str(plan))
    assert rc == 0
    first, second = contexts[0].chunk(2)[1], contexts[-1].chunk(2)[1]
    emb = timestep_embedding(torch.tensor([1.0, 0.0]), 128)
    torch.testing.assert_close(first[0, 0, COLUMNS["command"]], emb[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(second[0, 0, COLUMNS["command"]], emb[1], rtol=0, atol=1e-6)
    assert first[..., COLUMNS["speed"]].any() and not second[..., COLUMNS["speed"]].any()
    assert not first[..., COLUMNS["trajectory"]].any()  # only the JSON's keys are shown
    record = json.load(open(os.path.join(save, "toy_000000", "sample.json")))
    assert record["actions"]["from"] == "json"
    assert record["actions"]["rounds"] == [{"command": [1.0], "speed": [10.0] * 4}, {"command": [0.0]}]


def test_same_seed_reproduces_bit_for_bit_and_seeds_matter(ckpt, tmp_path):
    runs = [_run(ckpt[0], tmp_path, "--dataset", "TOY", "--index", "1", "--n_rounds", "2", "--png", *seed,
                 name=name)[1] for name, seed in (("a", []), ("b", []), ("c", ["--seed", "24"]))]
    a, b, c = (_pngs(os.path.join(r, "toy_000001", "frames")) for r in runs)
    assert a.shape == (7, 64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # The lossless PNGs are the bit-for-bit check: multi-threaded libx264 (vwm.media.write_mp4) may encode
    # identical frames differently from one call to the next.
    assert len(_frames(os.path.join(runs[0], "toy_000001", "generated.mp4"))) == 7


def test_each_index_gets_its_own_noise_and_the_loop_ends(ckpt, tmp_path):
    images = _images(str(tmp_path / "imgs"), count=2)
    rc, save = _run(ckpt[0], tmp_path, "--dataset", "IMG", "--image_dir", images, "--png",
                    "--batch_size", "2")
    assert rc == 0  # no --n_samples: every image once, then the loop ends
    a, b = (_pngs(os.path.join(save, f"img_00000{i}", "frames")) for i in range(2))
    assert not np.array_equal(a[1:], b[1:])  # identical start images, different noise streams
    assert sorted(os.listdir(save)) == ["img_000000", "img_000001", "run.json"]
    assert not os.path.exists(os.path.join(save, "img_000000", "ground_truth.mp4"))  # IMG has no ground truth


def test_random_order_is_a_seeded_permutation(ckpt, tmp_path):
    rc, save = _run(ckpt[0], tmp_path, "--dataset", "TOY", "--n_samples", "2", "--random_order")
    assert rc == 0
    names = [o["name"] for o in json.load(open(os.path.join(save, "run.json")))["outputs"]]
    expected = np.random.default_rng(23).permutation(100)[:2]
    assert names == [f"toy_{i:06d}" for i in expected]


def test_nuscenes_annotations_with_ground_truth_actions(ckpt, tmp_path):
    from vwm.data.toyworld import write_dataset

    _, anno = write_dataset(str(tmp_path / "nus"), 2, 5, 64, 64)
    rc, save = _run(ckpt[0], tmp_path, "--dataset", "NUSCENES", "--data_root", str(tmp_path / "nus"),
                    "--anno_file", anno, "--action", "traj", "--low_vram", "--n_conds", "3")
    assert rc == 0
    for i in range(2):
        record = json.load(open(os.path.join(save, f"nuscenes_{i:06d}", "sample.json")))
        expected = json.load(open(anno))[i]["traj"][2:]
        np.testing.assert_allclose(record["actions"]["rounds"][0]["trajectory"], expected, rtol=1e-6)


def test_reward_of_identical_samples_is_one_and_written(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(ro, "draw_noise", lambda shape, gens: torch.zeros(len(gens), *shape))
    save = str(tmp_path / "reward")
    assert main(["reward", "--ckpt", ckpt[0], "--save", save, "--dataset", "TOY", "--index", "0", "4",
                 "--ens_size", "3", "--height", "64", "--width", "64"]) == 0
    rows = list(csv.DictReader(open(os.path.join(save, "rewards.csv"))))
    assert [(r["name"], float(r["reward"])) for r in rows] == [("toy_000000", 1.0), ("toy_000004", 1.0)]
    record = json.load(open(os.path.join(save, "toy_000004", "sample.json")))
    assert record["reward"] == 1.0 and record["ens_size"] == 3
    assert record["settings"]["n_steps"] == 10 and record["actions"]["from"] == "dataset:traj"


def test_reward_of_a_real_ensemble_is_below_one(ckpt, tmp_path):
    rc, save = _run(ckpt[0], tmp_path, "--dataset", "TOY", "--index", "0", "--reward", "--ens_size", "2")
    assert rc == 0
    reward = json.load(open(os.path.join(save, "toy_000000", "sample.json")))["reward"]
    assert 0.0 < reward < 1.0


def test_pickle_checkpoints_are_refused_without_running_them(tmp_path, capsys):
    canary, live = tmp_path / "canary", tmp_path / "live"

    class Payload:
        def __init__(self, path):
            self.path = str(path)

        def __reduce__(self):
            return (open, (self.path, "w"))

    bad = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload(canary)}, bad)
    probe = str(tmp_path / "probe.ckpt")
    torch.save({"payload": Payload(live)}, probe)
    torch.load(probe, weights_only=False)
    assert live.exists()  # the payload is live: an unsafe loader would run it
    assert main(["--ckpt", bad, "--config", TINY_MODEL, "--dataset", "TOY", *FAST]) == 2
    assert "refused to unpickle" in capsys.readouterr().err
    assert not canary.exists()


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "missing.safetensors"], "--ckpt='missing.safetensors' does not exist"),
    (["--height", "100"], "--height=100 must be a positive multiple of 64"),
    (["--width", "0"], "--width=0 must be a positive multiple of 64"),
    (["--n_frames", "25"], "--n_frames=25 is invalid; allowed: 5"),
    (["--index", "100"], r"--index [100] out of range; allowed: 0 to 99"),
    (["--n_samples", "101"], "--n_samples=101 is invalid; allowed: <= 100"),
    (["--reward", "--ens_size", "1"], "--ens_size=1 is invalid; allowed: >= 2"),
    (["--n_conds", "4"], "n_conds=4 is invalid; allowed: an int in [0, 3]"),
    (["--actions_json", "nope.json"], "--actions_json='nope.json' is not an existing file"),
    (["--action", "traj", "--actions_json", "x.json"], "--action=traj and --actions_json both given"),
    (["--sigma_min", "0"], "--sigma_min=0.0 is invalid; allowed: 0 < sigma_min < --sigma_max (700)"),
    (["--sigma_min", "5", "--sigma_max", "4"],
     "--sigma_min=5.0 is invalid; allowed: 0 < sigma_min < --sigma_max (4)"),
    (["--sigma_max", "nan"], "--sigma_max=nan is invalid; allowed: a finite number > 0"),
])
def test_user_errors_exit_2_with_a_clear_message(ckpt, tmp_path, capsys, args, message):
    base = ["--ckpt", ckpt[0], "--dataset", "TOY", "--save", str(tmp_path / "o"), *FAST]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_sigma_flags_set_the_noise_schedule(ckpt, tmp_path, monkeypatch):
    from vwm.cli.sample import DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN

    assert (DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX) == (ro.SIGMA_MIN, ro.SIGMA_MAX)
    levels = []
    make = ro.make_sampler

    def spy(name, n_steps, guider, *schedule):
        sampler = make(name, n_steps, guider, *schedule)
        levels.append(sampler.discretization(n_steps).tolist())
        return sampler

    monkeypatch.setattr(ro, "make_sampler", spy)
    runs = {}
    for name, extra in (("default", []), ("demo", ["--sigma_min", "4", "--sigma_max", "60"])):
        rc, save = _run(ckpt[0], tmp_path, "--dataset", "TOY", "--index", "0", "--png", *extra, name=name)
        assert rc == 0
        runs[name] = _pngs(os.path.join(save, "toy_000000", "frames"))
        with open(os.path.join(save, "toy_000000", "sample.json")) as f:
            settings = json.load(f)["settings"]
        assert (settings["sigma_min"], settings["sigma_max"]) == ((4.0, 60.0) if extra else (0.002, 700.0))
    assert [lv[0] for lv in levels] == [pytest.approx(700.0), pytest.approx(60.0)]
    assert [lv[-2:] for lv in levels] == [[pytest.approx(0.002), 0.0], [pytest.approx(4.0), 0.0]]
    assert not np.array_equal(runs["default"][1:], runs["demo"][1:])


def test_a_checkpoint_without_config_gets_the_shipped_config_of_its_layout(ckpt, tmp_path, capsys, caplog):
    # The released vista.safetensors embeds no config (issue #14.2): the shipped config whose tensor names and
    # shapes it matches exactly is used; here the bare tiny weights match configs/tiny/model.yaml.
    args = ["--ckpt", ckpt[1], "--dataset", "TOY", "--index", "0", "--save", str(tmp_path / "o"), *FAST]
    assert main(args) == 0
    assert "match configs/tiny/model.yaml exactly" in caplog.text
    with open(tmp_path / "o" / "run.json") as f:
        assert json.load(f)["config"].startswith("configs/tiny/model.yaml")
    assert main(args + ["--config", TINY_MODEL]) == 0
    # Weights of no shipped layout still need --config.
    from safetensors.torch import load_file

    state = load_file(ckpt[1])
    state.pop(sorted(state)[0])
    odd = str(tmp_path / "odd.safetensors")
    save_file(state, odd)
    assert main(["--ckpt", odd, "--dataset", "TOY", "--index", "0", "--save", str(tmp_path / "p"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "carries no model config" in err and "matches none of" in err and "pass --config" in err


@pytest.mark.parametrize("args, message", [
    (["--action", "left"], "argument --action: invalid choice: 'left'"),
    (["--index", "1", "--n_samples", "2"], "not allowed with argument"),
])
def test_argument_errors(ckpt, capsys, args, message):
    assert main(["--ckpt", ckpt[0], *args]) == 2
    assert message in capsys.readouterr().err


def test_image_mode_errors(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--ckpt", ckpt[0], "--dataset", "IMG", "--image_dir", str(empty), *FAST]) == 2
    assert "holds no image" in capsys.readouterr().err
    assert main(["--ckpt", ckpt[0], "--dataset", "IMG", "--image_dir", str(empty), "--action", "goal"]) == 2
    assert "--dataset IMG has no ground-truth actions" in capsys.readouterr().err


def test_dry_run_prints_the_plan(ckpt, capsys):
    assert main(["--ckpt", ckpt[0], "--dataset", "TOY", "--n_rounds", "4", "--dry-run", *FAST]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["samples"] == 100 and plan["frames_per_video"] == 11 and plan["parameters"]["model"] > 0


def test_sample_py_end_to_end_in_a_subprocess(ckpt, tmp_path):
    save = str(tmp_path / "e2e")
    cmd = [sys.executable, os.path.join(REPO, "sample.py"), "--ckpt", ckpt[0], "--dataset", "TOY",
           "--index", "3", "--n_rounds", "2", "--action", "steer", "--gif", "--save", save, *FAST]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 sample(s) of 7 frames" in proc.stdout
    assert "denoising" in proc.stderr  # progress bars go to stderr
    folder = os.path.join(save, "toy_000003")
    assert sorted(os.listdir(folder)) == ["comparison.mp4", "generated.gif", "generated.mp4",
                                          "ground_truth.mp4", "sample.json"]
    assert len(_frames(os.path.join(folder, "generated.mp4"))) == 7


def test_decode_dtype_bf16_decodes_in_bf16_within_rounding_of_fp32(ckpt, tmp_path, monkeypatch):
    """--decode_dtype bf16 runs the VAE decoder in bf16: the frames differ from the fp32 decode's by a few
    8-bit levels at most, and the decoder really received bf16 latents; the default (auto) is fp32 on a CPU."""
    from vwm.models import autoencoder

    seen = []
    decode = autoencoder.AutoencodingEngine.decode

    def spy(self, z, timesteps):
        out = decode(self, z, timesteps)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(autoencoder.AutoencodingEngine, "decode", spy)
    runs = []
    for name, extra in (("fp32", ["--decode_dtype", "fp32"]), ("bf16", ["--decode_dtype", "bf16"]), ("auto", [])):
        seen.clear()
        runs.append(_run(ckpt[0], tmp_path, "--dataset", "TOY", "--index", "1", "--png", *extra, name=name))
        runs[-1] += (set(seen),)
    assert [rc for rc, _, _ in runs] == [0, 0, 0]
    # the default (auto) decodes in bf16 on CUDA only: on this CPU it is the fp32 decode
    assert [dtypes for _, _, dtypes in runs] == [{torch.float32}, {torch.bfloat16}, {torch.float32}]
    a, b, c = (_pngs(os.path.join(save, "toy_000001", "frames")).astype(int) for _, save, _ in runs)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 8 and np.abs(a - b).mean() < 1.0
    assert np.array_equal(a, c)


def test_cudnn_benchmark_is_opt_in_and_only_on_cuda(monkeypatch):
    """--cudnn_benchmark lets cuDNN pick convolution algorithms by timing (0.5 s less per 25x576x1024 rollout on an
    H100, docs/performance.md) at the cost of run-to-run bit-identity, so it is off unless asked for, and a CPU run
    never touches the flag."""
    from vwm.cli.sample import parser
    from vwm.sampling.options import SampleOptions
    from vwm.sampling.run import apply_cudnn_benchmark

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert parser().parse_args([]).cudnn_benchmark is False
    assert parser().parse_args(["--cudnn_benchmark"]).cudnn_benchmark is True
    assert apply_cudnn_benchmark(SampleOptions(cudnn_benchmark=False), torch.device("cuda")) is False
    assert apply_cudnn_benchmark(SampleOptions(cudnn_benchmark=True), torch.device("cpu")) is False
    assert torch.backends.cudnn.benchmark is False
    assert apply_cudnn_benchmark(SampleOptions(cudnn_benchmark=True), torch.device("cuda")) is True
    assert torch.backends.cudnn.benchmark is True
