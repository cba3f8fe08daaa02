"""Weights from untrusted places: malicious pickles are refused by every entry point (train.py --finetune,
bin_to_st.py, sample.py, DeepSpeed directories before DeepSpeed's own unrestricted loader), truncated or
incomplete checkpoints are refused naming the file, and non-finite weights are refused naming the tensor."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import clean_subprocess_env
from helpers import REPO, TINY_MODEL, build_tiny
from safetensors.torch import save_file

from vwm.checkpoint import CheckpointError, load_weights, read_state_dict
from vwm.cli.export import main as export_main


class Payload:
    """Unpickling this runs a shell command that creates `path` (what an attacker's checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def _evil(tmp_path, name: str, legacy: bool = False) -> tuple[str, str]:
    """(malicious checkpoint, canary path it would create)."""
    canary = str(tmp_path / f"canary-{name}")
    path = str(tmp_path / name)
    content = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "hook": Payload(canary)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(content, f)
    else:
        torch.save(content, path)
    return path, canary


def test_the_payload_is_live(tmp_path):
    path, canary = _evil(tmp_path, "probe.bin")
    torch.load(path, weights_only=False)
    assert os.path.exists(canary)  # so an unsafe loader in the code under test would be caught


@pytest.mark.parametrize("name, legacy", [("evil.bin", False), ("evil.ckpt", False), ("evil.pt", False),
                                          ("legacy.bin", True)])
def test_read_state_dict_refuses_malicious_pickles(tmp_path, name, legacy):
    path, canary = _evil(tmp_path, name, legacy)
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*convert it to safetensors"):
        read_state_dict(path)
    assert not os.path.exists(canary)


def test_a_non_allowlisted_global_is_refused_with_no_unsafe_fallback(tmp_path):
    path = str(tmp_path / "namespace.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_state_dict(path)


def test_bin_to_st_refuses_a_malicious_pickle(tmp_path, capsys):
    path, canary = _evil(tmp_path, "pytorch_model.bin")
    dst = tmp_path / "out.safetensors"
    assert export_main([path, str(dst), "--config", TINY_MODEL]) == 2
    assert "refused to unpickle" in capsys.readouterr().err
    assert not os.path.exists(canary) and not dst.exists()


@pytest.mark.parametrize("cli", ["train.py", "sample.py"])
def test_train_and_sample_clis_refuse_a_malicious_pickle(tmp_path, cli):
    path, canary = _evil(tmp_path, "evil.bin")
    if cli == "train.py":
        args = ["--base", os.path.join(REPO, "configs", "tiny", "train.yaml"), "--finetune", path,
                "--accelerator", "cpu", "--n_devices", "1", "--max_steps", "1",
                "--logdir", str(tmp_path / "logs")]
    else:
        args = ["--ckpt", path, "--config", TINY_MODEL, "--dataset", "TOY", "--n_samples", "1", "--height",
                "64", "--width", "64", "--n_steps", "1", "--device", "cpu", "--save", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, os.path.join(REPO, cli), *args], env=clean_subprocess_env(),
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode != 0
    assert "refused to unpickle" in result.stderr
    assert not os.path.exists(canary)


def _zero_dir(tmp_path, shards: int = 2) -> tuple[str, str]:
    """A DeepSpeed-style checkpoint dir (`latest` -> tag dir with model states and optimizer shards)."""
    root = tmp_path / "step-000000003"
    tag = root / "checkpoint"
    tag.mkdir(parents=True)
    (root / "latest").write_text("checkpoint")
    states = {"module": {"model.w": torch.zeros(2)}, "buffer_names": [], "dp_world_size": 2, "global_step": 3}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    for rank in range(shards):
        torch.save({"optimizer_state_dict": {}}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return str(root), str(tag)


def test_a_poisoned_deepspeed_shard_is_refused_before_deepspeed_loads_it(tmp_path, monkeypatch, capsys):
    import deepspeed.utils.zero_to_fp32 as z2f

    root, tag = _zero_dir(tmp_path)
    shard = os.path.join(tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    canary = str(tmp_path / "canary")
    torch.save({"optimizer_state_dict": Payload(canary)}, shard)
    called = []
    monkeypatch.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint", lambda *a, **k: called.append(a))
    with pytest.raises(CheckpointError, match=rf"{os.path.basename(shard)}: refused to unpickle"):
        read_state_dict(root)
    assert export_main([root, str(tmp_path / "o.safetensors"), "--config", TINY_MODEL]) == 2
    assert "refused to unpickle" in capsys.readouterr().err
    assert called == [] and not os.path.exists(canary)


def test_a_deepspeed_dir_with_a_missing_optimizer_shard_is_refused_naming_it(tmp_path, capsys):
    root, _ = _zero_dir(tmp_path, shards=1)
    with pytest.raises(CheckpointError, match=r"expected 2 optimizer shards, found 1; missing: "
                                              r"zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        read_state_dict(root)
    assert export_main([root, str(tmp_path / "o.safetensors"), "--config", TINY_MODEL]) == 2
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in capsys.readouterr().err


def test_a_manifest_mismatch_names_the_file(tmp_path):
    root, tag = _zero_dir(tmp_path)
    files = {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(root) for f in fs}
    with open(os.path.join(root, "MANIFEST.json"), "w") as f:
        json.dump({"step": 3, "format": "deepspeed", "files": files}, f)
    shard = os.path.join(tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 1)
    name = "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with pytest.raises(CheckpointError, match=rf"file {name} has \d+ bytes, manifest says"):
        read_state_dict(root)
    os.remove(shard)
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt listed in the "
                                              r"manifest is missing"):
        read_state_dict(root)


def _tiny_safetensors(tmp_path, name="tiny.safetensors", **replace) -> tuple[str, dict]:
    state = {k: v.contiguous() for k, v in build_tiny().state_dict().items()
             if not k.startswith("model_ema.")}
    state.update(replace)
    path = str(tmp_path / name)
    save_file(state, path)
    return path, state


@pytest.mark.parametrize("damage", ["truncated", "huge-header"])
def test_a_damaged_safetensors_is_refused_naming_the_file(tmp_path, capsys, damage):
    path, _ = _tiny_safetensors(tmp_path)
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
    else:
        with open(path, "r+b") as f:
            f.write((2**40).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match=rf"{path}: not a valid safetensors file"):
        load_weights(build_tiny(), path)
    assert export_main([path, str(tmp_path / "o.safetensors"), "--config", TINY_MODEL]) == 2
    assert f"{path}: not a valid safetensors file" in capsys.readouterr().err


def test_a_non_finite_weight_is_refused_naming_the_tensor(tmp_path, capsys):
    key = "model.diffusion_model.out.2.bias"
    path, _ = _tiny_safetensors(tmp_path, **{key: torch.tensor([0.0, float("nan"), 0.0, 0.0])})
    with pytest.raises(CheckpointError, match=rf"tensor {key} contains NaN or Inf"):
        load_weights(build_tiny(), path)
    assert export_main([path, str(tmp_path / "o.safetensors"), "--config", TINY_MODEL]) == 2
    assert f"tensor {key} contains NaN or Inf" in capsys.readouterr().err


def test_zero_to_fp32_output_directories_are_read_and_a_missing_shard_is_named(tmp_path):
    path, state = _tiny_safetensors(tmp_path)
    out = tmp_path / "pytorch_model.bin"  # recent zero_to_fp32.py writes a directory of this name
    out.mkdir()
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for shard, part in halves.items():
        torch.save({k: state[k] for k in part}, out / shard)
    weight_map = {k: shard for shard, part in halves.items() for k in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sd, _ = read_state_dict(out)
    assert sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in state)
    os.remove(out / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002.bin: shard listed in .*missing"):
        read_state_dict(out)
