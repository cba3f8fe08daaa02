"""Latent cache (vwm.data.latents): the build CLI, the index and shards, the reader subset, training from the
cache giving the first-step loss of training from pixels, and the errors (VAE identity, size, truncated shard,
mixing).

Tolerances on the tiny config: an fp32 cache reproduces the pixel path's loss within 1e-6 absolute (measured:
bit-identical on CPU, and so is train.py's logged loss); a bf16 cache within 1e-3 relative (measured <= 6e-5);
an fp16 cache within 1e-4 relative (measured <= 5e-6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import clean_subprocess_env
from helpers import REPO
from safetensors import safe_open
from safetensors.torch import save_file

TRAIN_CFG = os.path.join(REPO, "configs", "tiny", "train.yaml")
CLIPS = 5
TOY = {"target": "vwm.data.toyworld.ToyWorldSubset", "params": {"length": CLIPS, "seed": 0}}
TOY_OVERRIDE = f"data.params.subsets=[{{target: {TOY['target']}, params: {{length: {CLIPS}, seed: 0}}}}]"


def _cache_spec(cache_dir, **params):
    return {"target": "vwm.data.latents.LatentCacheSubset", "params": {"cache_dir": str(cache_dir), **params}}


def _tiny_train_engine(seed: int):
    """The tiny training config's model with its zero-initialised layers re-drawn (so every path matters)."""
    from vwm.config import build_model, load_config

    torch.manual_seed(seed)
    engine = build_model(load_config(TRAIN_CFG))
    with torch.no_grad():
        for p in engine.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    engine.model_ema.reset(engine.model)
    return engine


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of the first CLIPS toy-world clips built through the real CLI from a full-model weight file."""
    root = tmp_path_factory.mktemp("latent_cache")
    engine = _tiny_train_engine(seed=0)
    weights = root / "full.safetensors"
    save_file({k: v.contiguous() for k, v in engine.state_dict().items() if not k.startswith("model_ema.")},
              str(weights))
    out = root / "cache"
    cmd = [sys.executable, "-m", "vwm.data.latents", "build", "--config", TRAIN_CFG, "--ckpt", str(weights),
           "--out", str(out), "--shard_size", "3", "--device", "cpu", TOY_OVERRIDE]
    result = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return SimpleNamespace(root=root, dir=out, weights=weights, engine=engine, summary=summary)


def _datamodule(subsets, **kwargs):
    from vwm.data.datamodule import VideoDataModule

    params = dict(batch_size=2, subsets=subsets, samples_per_epoch=4, target_height=64, target_width=64,
                  num_frames=5, seed=0, shuffle=False)
    params.update(kwargs)
    dm = VideoDataModule(**params)
    dm.setup()
    return dm


def _device_batches(dm):
    return [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]


def test_cli_writes_index_and_shards(cache):
    from vwm.data.latents import FORMAT, FORMAT_VERSION, first_stage_identity, read_index

    index = read_index(str(cache.dir))
    assert (index["format"], index["version"], index["num_clips"]) == (FORMAT, FORMAT_VERSION, CLIPS)
    assert (index["num_frames"], index["height"], index["width"]) == (5, 64, 64)
    assert index["latent_shape"] == [5, 8, 8, 8] and index["moments_dtype"] == "fp32"
    assert index["first_stage"]["identity"] == first_stage_identity(cache.engine.first_stage_model)
    assert index["first_stage"]["weights"] == str(cache.weights)
    assert index["first_stage"]["config"]["target"] == "vwm.models.autoencoder.AutoencodingEngine"
    assert index["data"]["subsets"] == [TOY]
    assert [(s["file"], s["first"], s["count"]) for s in index["shards"]] == [
        ("shard-00000.safetensors", 0, 3), ("shard-00001.safetensors", 3, 2)]
    assert index["clips"]["subset"] == [0] * CLIPS and index["clips"]["index"] == list(range(CLIPS))
    assert sorted(os.listdir(cache.dir)) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    with safe_open(str(cache.dir / "shard-00001.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {"3.moments", "3.frame0", "4.moments", "4.frame0"} <= names
    assert {n.split(".")[0] for n in names} == {"3", "4"}
    assert cache.summary["num_clips"] == CLIPS
    assert cache.summary["first_stage"] == index["first_stage"]["identity"]
    assert cache.summary["bytes"] == sum(s["bytes"] for s in index["shards"])


def test_subset_returns_the_stored_moments_frame_and_actions(cache):
    from vwm.data.latents import LatentCacheSubset, encode_moments
    from vwm.data.toyworld import ToyWorldSubset

    subset = LatentCacheSubset(5, 64, 64, cache_dir=str(cache.dir))
    pixels = ToyWorldSubset(5, 64, 64, length=CLIPS, seed=0)
    assert len(subset) == CLIPS
    for i in (0, 3, 4):
        clip, ref = subset.load_clip(i), pixels.load_clip(i)
        shard = cache.dir / f"shard-{i // 3:05d}.safetensors"
        with safe_open(str(shard), framework="pt") as f:
            assert torch.equal(clip.moments, f.get_tensor(f"{i}.moments"))
        expected = encode_moments(cache.engine.first_stage_model, ref.frames, 5)
        assert clip.moments.dtype == torch.float32 and torch.equal(clip.moments, expected)
        assert clip.frames.dtype == torch.uint8 and torch.equal(clip.frames, ref.frames[:1])
        assert clip.actions.keys() == ref.actions.keys()
        assert all(torch.equal(clip.actions[k], ref.actions[k]) for k in ref.actions)
        assert clip.source == ref.source
    with pytest.raises(IndexError, match="index=5"):
        subset.load_clip(CLIPS)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_first_step_loss_from_cache_equals_loss_from_pixels(cache, tmp_path, dtype):
    from vwm.config import load_config
    from vwm.data.latents import build_cache

    cache_dir = cache.dir
    if dtype != "fp32":
        cache_dir = tmp_path / dtype
        build_cache(load_config(TRAIN_CFG, [TOY_OVERRIDE]), str(cache_dir), ckpt=str(cache.weights),
                    dtype=dtype)
    engine = cache.engine
    pixel_batches = _device_batches(_datamodule([TOY]))
    cached_batches = _device_batches(_datamodule([_cache_spec(cache_dir)]))
    assert len(pixel_batches) == len(cached_batches) == 2
    rtol = {"fp32": 0.0, "bf16": 1e-3, "fp16": 1e-4}[dtype]
    for step, (pixels, cached) in enumerate(zip(pixel_batches, cached_batches)):
        assert torch.equal(pixels["sample_id"], cached["sample_id"])
        z_pixels = engine.latents_of(pixels, engine.make_generator(step, 0))
        z_cached = engine.latents_of(cached, engine.make_generator(step, 0))
        torch.testing.assert_close(z_cached, z_pixels, rtol=0.0, atol=1e-6 if dtype == "fp32" else 2e-2)
        loss_pixels = engine.compute_loss(pixels, engine.make_generator(step, 0)).loss.item()
        loss_cached = engine.compute_loss(cached, engine.make_generator(step, 0)).loss.item()
        assert abs(loss_cached - loss_pixels) <= (1e-6 if dtype == "fp32" else rtol * abs(loss_pixels)), (
            dtype, loss_cached, loss_pixels)


def test_datamodule_over_the_cache_yields_contract_batches(cache):
    from vwm.actions import ACTION_FEATURES, ACTION_KEYS

    dm = _datamodule([_cache_spec(cache.dir)], action_visibility="all")
    raw = next(iter(dm.train_dataloader()))
    assert "img_seq" not in raw and raw["cond_frames_without_noise"].dtype == torch.uint8
    batch = dm.on_after_batch_transfer(raw, 0)
    assert batch["latent_moments"].shape == (2, 5, 8, 8, 8) and batch["latent_moments"].dtype == torch.float32
    key = "cond_frames_without_noise"  # the noisy cond_frames are the training step's (vwm.training.step)
    assert batch[key].shape == (2, 3, 64, 64) and batch[key].dtype == torch.float32
    assert batch[key].min() >= -1.0 and batch[key].max() <= 1.0
    for key in ACTION_KEYS:
        assert batch[key].shape == (2, ACTION_FEATURES[key])
    assert batch["action_mask"].shape == (2, len(ACTION_KEYS)) and batch["action_mask"].any()
    for key in ("cond_aug", "fps_id", "motion_bucket_id", "n_skipped"):
        assert batch[key].shape == (2,)
    videos = cache.engine.log_videos(batch, n=1)
    assert videos["samples"].shape == videos["reconstructions"].shape == (1, 5, 3, 64, 64)
    assert "inputs" not in videos


def test_a_cache_of_other_vae_weights_is_refused_with_both_hashes(cache):
    from vwm.data.latents import LatentCacheSubset, first_stage_identity

    other = _tiny_train_engine(seed=1)
    ours = first_stage_identity(cache.engine.first_stage_model)
    theirs = first_stage_identity(other.first_stage_model)
    assert ours != theirs
    subset = LatentCacheSubset(5, 64, 64, cache_dir=str(cache.dir))
    subset.check_model(cache.engine)
    with pytest.raises(ValueError, match="encoded with first stage") as err:
        subset.check_model(other)
    assert ours in str(err.value) and theirs in str(err.value)
    with pytest.raises(ValueError, match=f"built with first stage {ours}, expected_first_stage={theirs}"):
        LatentCacheSubset(5, 64, 64, cache_dir=str(cache.dir), expected_first_stage=theirs)
    LatentCacheSubset(5, 64, 64, cache_dir=str(cache.dir), expected_first_stage=ours)


def test_a_frame_count_or_resolution_mismatch_is_refused(cache):
    from vwm.data.latents import LatentCacheSubset

    with pytest.raises(ValueError, match="built with num_frames=5, the DataModule has num_frames=4"):
        LatentCacheSubset(4, 64, 64, cache_dir=str(cache.dir))
    with pytest.raises(ValueError, match="built with target_width=64, the DataModule has target_width=128"):
        LatentCacheSubset(5, 64, 128, cache_dir=str(cache.dir))
    with pytest.raises(ValueError, match="built with target_height=64, the DataModule has target_height=128"):
        _datamodule([_cache_spec(cache.dir)], target_height=128)


def test_a_truncated_or_missing_shard_or_index_is_refused_naming_the_file(cache, tmp_path):
    from vwm.data.latents import LatentCacheSubset

    broken = tmp_path / "broken"
    shutil.copytree(cache.dir, broken)
    shard = broken / "shard-00001.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(ValueError, match=f"{shard}: .* bytes but .* records .*truncated"):
        LatentCacheSubset(5, 64, 64, cache_dir=str(broken))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}: shard listed in .*index.json is missing"):
        LatentCacheSubset(5, 64, 64, cache_dir=str(broken))
    (broken / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no index.json"):
        LatentCacheSubset(5, 64, 64, cache_dir=str(broken))


def test_mixing_cached_and_pixel_subsets_is_an_error(cache):
    with pytest.raises(ValueError, match=r"subsets mix latent caches \['LatentCacheSubset'\] with pixel "
                                         r"sources \['ToyWorldSubset'\]"):
        _datamodule([_cache_spec(cache.dir), TOY])


def test_builder_errors(cache, tmp_path):
    from vwm.config import load_config
    from vwm.data.latents import build_cache

    cfg = load_config(TRAIN_CFG, [TOY_OVERRIDE])
    with pytest.raises(FileExistsError, match="already holds a latent cache"):
        build_cache(cfg, str(cache.dir), ckpt=str(cache.weights))
    unet_only = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(unet_only))
    with pytest.raises(ValueError, match="first_stage_model.\\* tensors do not fit"):
        build_cache(cfg, str(tmp_path / "a"), ckpt=str(unet_only))
    with pytest.raises(ValueError, match="builds PixelShuffleAutoencoder; the latent cache needs a VAE"):
        build_cache(load_config(os.path.join(REPO, "configs", "demo", "toyworld.yaml")), str(tmp_path / "b"))
    nested = load_config(TRAIN_CFG, [f"data.params.subsets=[{{target: vwm.data.latents.LatentCacheSubset, "
                                     f"params: {{cache_dir: {cache.dir}}}}}]"])
    with pytest.raises(ValueError, match="already hold latent caches"):
        build_cache(nested, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="--shard_size=0 must be"):
        build_cache(cfg, str(tmp_path / "d"), shard_size=0)


def test_builder_skips_and_records_broken_samples(cache, tmp_path, monkeypatch):
    from vwm.config import load_config
    from vwm.data.base import BrokenSampleError
    from vwm.data.latents import LatentCacheSubset, build_cache
    from vwm.data.toyworld import ToyWorldSubset

    load_clip = ToyWorldSubset.load_clip

    def flaky(self, index):
        if (self.seed, index) == (0, 1):
            raise BrokenSampleError("frames/clip1", "truncated JPEG")
        return load_clip(self, index)

    monkeypatch.setattr(ToyWorldSubset, "load_clip", flaky)
    toy = "{target: vwm.data.toyworld.ToyWorldSubset, params: {length: %d, seed: %d}}"
    cfg = load_config(TRAIN_CFG, [f"data.params.subsets=[{toy % (3, 0)}, {toy % (2, 1)}]"])
    index = build_cache(cfg, str(tmp_path / "flaky"), ckpt=str(cache.weights), shard_size=8)
    assert index["num_clips"] == 4
    assert index["skipped"] == [{"subset": 0, "index": 1, "path": "frames/clip1", "reason": "truncated JPEG"}]
    assert index["clips"]["subset"] == [0, 0, 1, 1] and index["clips"]["index"] == [0, 2, 0, 1]
    second = LatentCacheSubset(5, 64, 64, cache_dir=str(tmp_path / "flaky"), subset=1)
    assert len(second) == 2
    assert second.load_clip(1).source == index["clips"]["source"][3]
    with pytest.raises(ValueError, match="subset=2 must be null or a source number in \\[0, 2\\)"):
        LatentCacheSubset(5, 64, 64, cache_dir=str(tmp_path / "flaky"), subset=2)


def _train(tmp, name, *args):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--base", TRAIN_CFG, "--logdir", str(tmp),
           "--name", name, "--accelerator", "cpu", "--n_devices", "1", "--max_steps", "2", *args]
    return subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600,
                          cwd=str(tmp))


def _first_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(row["step"], row["loss"]) for row in map(json.loads, f)]


def test_train_py_from_the_cache_matches_training_from_pixels(cache, tmp_path):
    cached = _train(tmp_path, "cached", "--finetune", str(cache.weights),
                    f"data.params.subsets=[{{target: vwm.data.latents.LatentCacheSubset, "
                    f"params: {{cache_dir: {cache.dir}}}}}]")
    assert cached.returncode == 0, cached.stderr[-4000:]
    pixels = _train(tmp_path, "pixels", "--finetune", str(cache.weights), TOY_OVERRIDE)
    assert pixels.returncode == 0, pixels.stderr[-4000:]
    losses = _first_losses(tmp_path / "cached")
    assert [s for s, _ in losses] == [1, 2]
    assert losses == _first_losses(tmp_path / "pixels")
    assert (tmp_path / "cached" / "FINISHED").read_text().strip() == "2"


def test_train_py_refuses_a_cache_of_other_vae_weights(cache, tmp_path):
    from vwm.data.latents import read_index

    result = _train(tmp_path, "random", f"data.params.subsets=[{{target: vwm.data.latents.LatentCacheSubset, "
                                        f"params: {{cache_dir: {cache.dir}}}}}]")
    assert result.returncode != 0
    identity = read_index(str(cache.dir))["first_stage"]["identity"]
    assert f"was encoded with first stage {identity}" in result.stderr
    assert "but the model being trained has first stage sha256:" in result.stderr
