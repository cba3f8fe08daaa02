"""The whole recipe on CPU through the real CLIs (scripts/phases_tiny.sh: phase 1 -> export -> phase 2 stage 1
with LoRA and actions -> export -> stage 2 -> export -> sample), then what it must guarantee: every export
verified, PEFT phases keep the exact base weights in our merge, in DeepSpeed's own zero_to_fp32.py and in the
exports, LoRA-merged output equals the unmerged model's, EMA exports are the shadows, and real DeepSpeed dirs
are checked before use."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import clean_subprocess_env
from helpers import REPO, make_batch
from safetensors.torch import save_file

from vwm.checkpoint import (
    ema_key,
    load_weights,
    read_config_metadata,
    read_safetensors,
    read_state_dict,
    strip_prefixes,
)
from vwm.cli.export import main as export_main
from vwm.config import build_model, load_config
from vwm.export_verify import config_from_metadata

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = os.path.join(REPO, "scripts", "phases_tiny.sh")
RUNS = {"phase2_stage1": "phase1.safetensors", "phase2_stage2": "phase2_stage1.safetensors"}
"""PEFT run -> the export it was started from (--finetune)."""
LORA_TARGET = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The recipe's outputs, built once per test session: under pytest-xdist the workers share one build (the
    first to take the lock runs the script, about two CPU-minutes; the others wait and read it). The tests only
    read it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "phases_chain"
    with FileLock(str(out) + ".lock"):
        done, failed = out / "CHAIN_DONE", out / "CHAIN_FAILED"
        if failed.exists():
            pytest.fail(f"scripts/phases_tiny.sh failed (in another worker):\n{failed.read_text()}")
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            result = subprocess.run(["bash", SCRIPT, str(out)], env=clean_subprocess_env(PYTHON=sys.executable),
                                    capture_output=True, text=True, timeout=900, cwd=REPO)
            if result.returncode != 0:
                failed.write_text(f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
                pytest.fail(f"scripts/phases_tiny.sh failed:\n{failed.read_text()}")
            done.touch()
    return out


def _step_dir(chain, run: str) -> str:
    return sorted(glob.glob(str(chain / "logs" / run / "checkpoints" / "step-*")))[-1]


def _zero_to_fp32(step: str, out) -> dict[str, torch.Tensor]:
    """DeepSpeed's own zero_to_fp32.py, the copy inside the checkpoint dir, as the reference documents it."""
    result = subprocess.run([sys.executable, os.path.join(step, "zero_to_fp32.py"), step, str(out)],
                            env=clean_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return strip_prefixes(torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True))


def _lora_pairs(sd):
    for key in sd:
        if key.endswith("_adapter_down.weight") and key.startswith("model."):
            prefix, which = key[: -len("_adapter_down.weight")].rsplit(".", 1)
            yield key, f"{prefix}.{which}_adapter_up.weight", f"{prefix}.{LORA_TARGET[which]}.weight"


def test_every_export_verifies_and_the_final_one_samples(chain):
    for name in ("phase1", "phase2_stage1", "vista_tiny"):
        log = (chain / "ckpts" / f"{name}.export.log").read_text()
        assert "verified  strict load" in log and ": PASSED" in log, log
    _, metadata = read_safetensors(str(chain / "ckpts" / "vista_tiny.safetensors"))
    model = read_config_metadata(metadata)["model"]["params"]
    assert metadata["vwm_ema"] == "yes" and metadata["vwm_lora"] == "merged"
    network = model["network_config"]["params"]
    assert network["add_lora"] is False and network["action_control"] is True
    assert (chain / "samples" / "toy_000000" / "generated.mp4").stat().st_size > 0
    stage1 = (chain / "phase2_stage1.train.log").read_text()
    assert "initialised 224 lora tensors" in stage1 and "initialised 28 action_control tensors" in stage1
    assert "cond_time_stack_embed" not in stage1  # phase 1 already has it
    stage2 = (chain / "phase2_stage2.train.log").read_text()
    assert "lora tensors" not in stage2 and "action_control tensors" not in stage2  # continued, not re-made


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_peft_phase_keeps_the_exact_base_weights_it_started_from(chain, tmp_path, run):
    start, _ = read_state_dict(chain / "ckpts" / RUNS[run])
    step = _step_dir(chain, run)
    ours, _ = read_state_dict(step)
    deepspeed = _zero_to_fp32(step, tmp_path / "fp32")
    assert set(deepspeed) == set(ours)  # frozen weights included: nothing for our tools to restore
    base = [k for k in start if "adapter" not in k]
    assert len(base) > 1000
    for merged in (ours, deepspeed):
        assert [k for k in base if not torch.equal(merged[k], start[k])] == []
    trained = [k for k in ours if k.startswith("model.") and ema_key(k) in ours]
    assert trained and all("adapter" in k for k in trained)

    export = chain / "ckpts" / {"phase2_stage1": "phase2_stage1.safetensors",
                                "phase2_stage2": "vista_tiny.safetensors"}[run]
    exported, _ = read_safetensors(str(export))
    targets = {}
    for down, up, target in _lora_pairs(ours):
        targets[target] = (ours.get(ema_key(up), ours[up]), ours.get(ema_key(down), ours[down]))
    for key in base:
        if run == "phase2_stage2" and key in targets:  # merged: W + up @ down with the EMA adapters
            up, down = targets[key]
            torch.testing.assert_close(exported[key], start[key] + up @ down, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(exported[key], start[key]), key


@torch.no_grad()
def test_the_lora_merged_export_reproduces_the_unmerged_training_model(chain):
    run = chain / "logs" / "phase2_stage2"
    source = build_model(load_config(str(run / "config.yaml")))
    load_weights(source, _step_dir(chain, "phase2_stage2"), allow_missing=())
    source.model_ema.copy_to(source.model)
    path = str(chain / "ckpts" / "vista_tiny.safetensors")
    exported = build_model(config_from_metadata(read_safetensors(path)[1]))
    load_weights(exported, path, allow_missing=())
    cond, _ = exported.get_conditioning(make_batch(b=2, h=64, w=128))
    x = torch.randn(2, 5, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    sigma, mask = torch.tensor([2.0, 10.0]), exported.cond_mask_for(2, 5, [0])
    want = source.denoiser(source.model, x, sigma, cond, mask)
    got = exported.denoiser(exported.model, x, sigma, cond, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, p in source.model.named_parameters():  # trained adapters: dropping them moves the output
        if "_adapter_up" in name:
            p.zero_()
    assert (source.denoiser(source.model, x, sigma, cond, mask) - want).abs().max() > 1e-3


def test_ema_export_is_the_shadow_and_no_ema_the_raw_weights(chain, tmp_path):
    step = _step_dir(chain, "phase1")
    merged, _ = read_state_dict(step)
    ema, _ = read_safetensors(str(chain / "ckpts" / "phase1.safetensors"))
    assert export_main([step, str(tmp_path / "raw.safetensors"), "--no-ema"]) == 0
    raw, metadata = read_safetensors(str(tmp_path / "raw.safetensors"))
    assert metadata["vwm_ema"] == "no"
    trained = [k for k in merged if k.startswith("model.") and ema_key(k) in merged]
    assert len(trained) > 500
    assert all(torch.equal(ema[k], merged[ema_key(k)]) for k in trained)
    assert all(torch.equal(raw[k], merged[k]) for k in raw)
    moved = [k for k in trained if not torch.equal(merged[k], merged[ema_key(k)])]
    assert len(moved) > 0.9 * len(trained)
    assert all(not torch.equal(ema[k], raw[k]) for k in moved)


def test_zero_to_fp32_bin_exports_to_the_same_tensors(chain, tmp_path):
    step = _step_dir(chain, "phase2_stage2")
    _zero_to_fp32(step, tmp_path / "fp32")
    dst = tmp_path / "from_bin.safetensors"
    config = str(chain / "logs" / "phase2_stage2" / "config.yaml")
    assert export_main([str(tmp_path / "fp32" / "pytorch_model.bin"), str(dst), "--config", config]) == 0
    want = read_safetensors(str(chain / "ckpts" / "vista_tiny.safetensors"))[1]["vwm_tensors_sha256"]
    assert read_safetensors(str(dst))[1]["vwm_tensors_sha256"] == want


def test_a_real_deepspeed_dir_with_a_poisoned_or_missing_shard_is_refused(chain, tmp_path, capsys):
    copy = tmp_path / "step"
    shutil.copytree(_step_dir(chain, "phase1"), copy)
    shard = copy / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{canary}'",))

    torch.save({"optimizer_state_dict": Payload()}, shard)
    os.remove(copy / "MANIFEST.json")  # the manifest would refuse the new size first; test the pre-scan
    assert export_main([str(copy), str(tmp_path / "o.safetensors")]) == 2
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: refused to unpickle" in capsys.readouterr().err
    assert not canary.exists()

    shutil.rmtree(copy)
    shutil.copytree(_step_dir(chain, "phase1"), copy)
    os.remove(copy / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert export_main([str(copy), str(tmp_path / "o.safetensors"), "--config",
                        str(chain / "logs" / "phase1" / "config.yaml")]) == 2
    assert "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt listed in the manifest is missing" in \
        capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing keys the model needs: model.diffusion_model.out.2.bias"),
    ("unexpected", "unexpected keys not in the model: model.diffusion_model.bogus"),
])
def test_finetune_handoff_mismatches_fail_through_train_py_naming_the_keys(chain, tmp_path, damage, message):
    state, _ = read_state_dict(chain / "ckpts" / "phase1.safetensors")
    if damage == "missing":
        del state["model.diffusion_model.out.2.bias"]
    else:
        state["model.diffusion_model.bogus"] = torch.zeros(3)
    path = tmp_path / f"{damage}.safetensors"
    save_file(state, str(path))
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--base", os.path.join(REPO, "configs", "tiny",
           "phase2_stage1.yaml"), "--finetune", str(path), "--accelerator", "cpu", "--n_devices", "1",
           "--max_steps", "1", "--logdir", str(tmp_path / "logs")]
    result = subprocess.run(cmd, env=clean_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert not glob.glob(str(tmp_path / "logs" / "*" / "checkpoints" / "step-*"))
