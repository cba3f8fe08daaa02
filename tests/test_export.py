"""bin_to_st.py on the tiny model, in-process: EMA folding, LoRA merging, the reference's `.bin` layout,
dtypes, metadata and config resolution, verification (and that it can fail), phase-handoff checks and CLI
errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from helpers import REPO, make_batch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import vwm.export as export_module
from vwm.checkpoint import (
    CheckpointError,
    check_handoff,
    ema_key,
    load_finetune,
    load_weights,
    read_config_metadata,
    read_safetensors,
)
from vwm.cli.export import main
from vwm.config import build_model, load_config, to_container
from vwm.export import ExportOptions, export_checkpoint
from vwm.export_verify import TOLERANCES, VerificationError, config_from_metadata

PHASE1 = os.path.join(REPO, "configs", "tiny", "phase1.yaml")
PHASE2 = os.path.join(REPO, "configs", "tiny", "phase2_stage1.yaml")
LORA_TARGET = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


def _trained_phase2(seed: int = 0):
    """A tiny phase-2 engine: LoRA + action control, adapters trained, an EMA that differs from them."""
    torch.manual_seed(seed)
    model = build_model(load_config(PHASE2))
    params = dict(model.model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if "adapter" in name:
                p.normal_(0.0, 0.05)
            elif p.dim() > 1 and not p.any():  # zero-initialised output layers would hide every other weight
                p.normal_(0.0, 0.02)
        for name, shadow in zip(model.model_ema.param_names, model.model_ema.shadows()):
            shadow.copy_(params[name] + 0.02 * torch.randn_like(shadow))
    return model


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory):
    """A vwm DDP-style run dir (config.yaml, checkpoints/step-N/lightning.ckpt) of a trained phase-2 model."""
    root = tmp_path_factory.mktemp("run")
    model = _trained_phase2()
    OmegaConf.save(load_config(PHASE2), root / "config.yaml", resolve=True)
    step = root / "checkpoints" / "step-000000007"
    step.mkdir(parents=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": 7}, step / "lightning.ckpt")
    return step, sd


def _export(src, dst, *flags: str) -> str:
    rc = main([str(src), str(dst), *flags])
    assert rc == 0
    return str(dst)


def _lora_pairs(sd):
    for key in sd:
        if key.endswith("_adapter_down.weight") and key.startswith("model."):
            prefix, which = key[: -len("_adapter_down.weight")].rsplit(".", 1)
            yield key, f"{prefix}.{which}_adapter_up.weight", f"{prefix}.{LORA_TARGET[which]}.weight"


def test_export_folds_ema_merges_lora_and_writes_the_inference_layout(run_ckpt, tmp_path, capsys):
    step, sd = run_ckpt
    dst = _export(step, tmp_path / "out" / "vista.safetensors")
    summary = capsys.readouterr().out
    assert "the run's" in summary and "PASSED" in summary and "merged 112 adapter pairs" in summary
    out, metadata = read_safetensors(dst)

    config = read_config_metadata(metadata)
    params = config["model"]["params"]
    assert params["use_ema"] is False and params["network_config"]["params"]["add_lora"] is False
    assert params["network_config"]["params"]["action_control"] is True
    assert not {"loss_fn_config", "sampler_config", "scheduler_config", "train_peft_adapters"} & set(params)
    inference = build_model(config_from_metadata(metadata), device="meta")
    assert set(out) == set(inference.state_dict())
    assert not any("_adapter_down" in k or "_adapter_up" in k or k.startswith("model_ema.") for k in out)
    assert metadata["vwm_step"] == "7" and metadata["vwm_ema"] == "yes" and metadata["vwm_lora"] == "merged"
    assert metadata["vwm_dtype"] == "fp32" and metadata["vwm_source"] == str(step)

    shadow = {k: sd[ema_key(k)] for k in sd if k.startswith("model.") and ema_key(k) in sd}
    action = [k for k in shadow if "action_control" in k]
    assert action and all(torch.equal(out[k], shadow[k]) and not torch.equal(out[k], sd[k]) for k in action)
    merged_targets = set()
    for down, up, base in _lora_pairs(sd):
        w_up, w_down = shadow.get(up, sd[up]), shadow.get(down, sd[down])  # inert q/k ones are frozen: raw
        torch.testing.assert_close(out[base], sd[base] + w_up @ w_down, rtol=1e-6, atol=1e-7)
        merged_targets.add(base)
    for key in out:  # PEFT: the base weights are the frozen raw ones, untouched
        if key.startswith("model.") and key not in merged_targets and "adapter" not in key:
            assert torch.equal(out[key], sd[key]), key
    for key in out:
        if not key.startswith("model."):
            assert torch.equal(out[key], sd[key]), key

    with open(dst, "rb") as f:
        assert open(dst + ".sha256").read().split()[0] == hashlib.sha256(f.read()).hexdigest()
    assert sorted(os.listdir(tmp_path / "out")) == ["vista.safetensors", "vista.safetensors.sha256"]


def test_no_ema_exports_the_raw_weights_and_keep_lora_keeps_adapters(run_ckpt, tmp_path):
    step, sd = run_ckpt
    raw, _ = read_safetensors(_export(step, tmp_path / "raw.safetensors", "--no-ema", "--keep-lora"))
    ema, metadata = read_safetensors(_export(step, tmp_path / "ema.safetensors", "--ema", "--keep-lora"))
    assert read_config_metadata(metadata)["model"]["params"]["network_config"]["params"]["add_lora"] is True
    trained = [k for k in sd if k.startswith("model.") and ema_key(k) in sd]
    assert trained and all("adapter" in k for k in trained)
    for key in trained:
        assert torch.equal(raw[key], sd[key]) and torch.equal(ema[key], sd[ema_key(key)])
        assert not torch.equal(raw[key], ema[key])
    assert set(raw) == {k for k in sd if not k.startswith("model_ema.")}


@torch.no_grad()
def test_lora_merged_export_reproduces_the_unmerged_model(run_ckpt, tmp_path):
    step, sd = run_ckpt
    dst = _export(step, tmp_path / "merged.safetensors")
    source = build_model(load_config(PHASE2))
    load_weights(source, sd, allow_missing=())
    source.model_ema.copy_to(source.model)
    exported = build_model(config_from_metadata(read_safetensors(dst)[1]))
    load_weights(exported, dst, allow_missing=())

    batch = make_batch(b=2)
    cond, _ = exported.get_conditioning(batch)
    x = torch.randn(2, 5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([1.0, 10.0])
    mask = exported.cond_mask_for(2, 5, [0])
    want = source.denoiser(source.model, x, sigma, cond, mask)
    got = exported.denoiser(exported.model, x, sigma, cond, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, p in source.model.named_parameters():  # LoRA matters: without it the output moves far more
        if "_adapter_up" in name:
            p.zero_()
    assert (source.denoiser(source.model, x, sigma, cond, mask) - want).abs().max() > 1e-3


def _reference_bin(model, drop_base: bool) -> dict[str, torch.Tensor]:
    """The reference's zero_to_fp32 layout: `_forward_module.` prefixes, an EMA (dot-less names) of every UNet
    weight, `decay`/`num_updates`; with drop_base, the PEFT base weights missing (reference issue #16)."""
    gen = torch.Generator().manual_seed(5)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model_ema."):
            continue
        if key.startswith("model.diffusion_model."):
            out["_forward_module." + ema_key(key)] = value + 0.01 * torch.randn(value.shape, generator=gen)
            if drop_base and "adapter" not in key:
                continue
        out["_forward_module." + key] = value.clone()
    out["_forward_module.model_ema.decay"] = torch.tensor(0.9999)
    out["_forward_module.model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


@pytest.mark.parametrize("drop_base", [False, True], ids=["full", "issue16-missing-base-weights"])
def test_reference_bin_layout_exports_ema_for_every_unet_weight(tmp_path, capsys, drop_base):
    model = _trained_phase2(seed=1)
    ref = _reference_bin(model, drop_base)
    src = tmp_path / "pytorch_model.bin"
    torch.save(ref, src)
    out, metadata = read_safetensors(_export(src, tmp_path / "vista.safetensors", "--config", PHASE2))
    summary = capsys.readouterr().out
    assert ("filled" in summary) == drop_base and "PASSED" in summary
    assert set(out) == set(build_model(config_from_metadata(metadata), device="meta").state_dict())
    ema = {k[len("_forward_module."):]: v for k, v in ref.items() if ".model_ema.diffusion_model" in k}
    shadow = {k: ema[ema_key(k)] for k in model.state_dict() if k.startswith("model.diffusion_model.")}
    merged = set()
    for down, up, base in _lora_pairs(model.state_dict()):
        torch.testing.assert_close(out[base], shadow[base] + shadow[up] @ shadow[down], rtol=1e-6, atol=1e-7)
        merged.add(base)
    unet = [k for k in out if k.startswith("model.diffusion_model.") and k not in merged]
    assert unet and all(torch.equal(out[k], shadow[k]) for k in unet)
    assert any("action_control" in k for k in unet)


def test_reexport_of_an_export_uses_its_embedded_config_and_is_identical(run_ckpt, tmp_path):
    step, _ = run_ckpt
    first = _export(step, tmp_path / "a.safetensors")
    second = export_checkpoint(ExportOptions(src=first, dst=str(tmp_path / "b.safetensors")))
    assert second.config_source.startswith("embedded in")
    assert second.tensors_sha256 == read_safetensors(first)[1]["vwm_tensors_sha256"]


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_export_verifies_within_its_tolerance(run_ckpt, tmp_path, dtype, torch_dtype):
    step, _ = run_ckpt
    result = export_checkpoint(ExportOptions(src=str(step), dst=str(tmp_path / "h.safetensors"), dtype=dtype))
    assert result.verification.passed and result.verification.rel_l2 > 0
    assert result.verification.tolerance == TOLERANCES[dtype]
    out, metadata = read_safetensors(str(tmp_path / "h.safetensors"))
    assert metadata["vwm_dtype"] == dtype
    assert {v.dtype for v in out.values() if v.is_floating_point()} == {torch_dtype}


def test_a_wrong_merge_fails_verification_and_publishes_nothing(run_ckpt, tmp_path, monkeypatch, capsys):
    step, _ = run_ckpt
    real = export_module.merge_lora
    monkeypatch.setattr(export_module, "merge_lora", lambda sd, scale: real(sd, 2.0 * scale))
    with pytest.raises(VerificationError, match="FAILED"):
        export_checkpoint(ExportOptions(src=str(step), dst=str(tmp_path / "bad.safetensors")))
    assert main([str(step), str(tmp_path / "bad.safetensors")]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_frozen_weights_stored_in_bf16_are_restored_from_the_starting_weights(run_ckpt, tmp_path, capsys):
    step, sd = run_ckpt
    start = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("model_ema.")}, str(start))
    run = tmp_path / "run"
    shutil.copytree(step.parent.parent, run)
    keep = ("adapter", "model_ema.")  # DeepSpeed under bf16 training stores the frozen weights in bf16
    frozen = {k: (v if any(p in k for p in keep) or not v.is_floating_point() else v.bfloat16())
              for k, v in sd.items()}
    torch.save({"state_dict": frozen}, run / "checkpoints" / "step-000000007" / "lightning.ckpt")
    src = run / "checkpoints" / "step-000000007"
    _export(src, tmp_path / "lossy.safetensors", "--keep-lora")
    assert "reduced precision" in capsys.readouterr().out
    exact = _export(src, tmp_path / "exact.safetensors", "--keep-lora", "--frozen-from", str(start))
    out, _ = read_safetensors(exact)
    assert "restored" in capsys.readouterr().out
    assert all(torch.equal(out[k], sd[k]) for k in out if "adapter" not in k)
    changed = dict(frozen)
    changed["model.diffusion_model.out.2.bias"] = changed["model.diffusion_model.out.2.bias"] + 1
    torch.save({"state_dict": changed}, src / "lightning.ckpt")
    assert main([str(src), str(tmp_path / "x.safetensors"), "--frozen-from", str(start)]) == 2
    assert "differ from the starting weights given: model.diffusion_model.out.2.bias" in \
        capsys.readouterr().err


def test_handoff_allows_only_what_a_phase_adds(tmp_path):
    phase1 = build_model(load_config(PHASE1))
    src = tmp_path / "phase1.safetensors"
    state = {k: v.contiguous() for k, v in phase1.state_dict().items() if not k.startswith("model_ema.")}
    config = json.dumps({"model": to_container(load_config(PHASE1).model)})
    save_file(state, str(src), metadata={"vwm_config": config})
    phase2_cfg = load_config(PHASE2)
    phase2 = build_model(phase2_cfg)
    report = load_finetune(phase2, src, phase2_cfg.model)
    assert set(report.initialised) == {"action_control", "lora", "ema"}
    sd = phase2.state_dict()
    assert all(not sd[k].any() for k in report.initialised["action_control"])
    assert all(torch.equal(sd[k], state[k]) for k in state)

    heads = load_config(PHASE2, ["model.params.network_config.params.num_head_channels=8"])
    with pytest.raises(CheckpointError, match=r"network_config.num_head_channels: checkpoint 16, config 8"):
        load_finetune(build_model(heads), src, heads.model)
    scaling = load_config(PHASE2, ["model.params.scale_factor=0.5"])
    with pytest.raises(CheckpointError, match=r"scale_factor: checkpoint 0.18215, config 0.5"):
        check_handoff(load_config(PHASE1).model, scaling.model, str(src))
    with pytest.raises(CheckpointError, match=r"emb_models: checkpoint has 10 embedders, config 5"):
        check_handoff(phase2_cfg.model, load_config(PHASE1).model, "phase2.safetensors")
    # memory settings are the phase's own choice
    memory = load_config(PHASE2, ["model.params.network_config.params.use_checkpoint=False",
                                  "model.params.network_config.params.checkpoint_budget_gib=40"])
    check_handoff(load_config(PHASE1).model, memory.model, str(src))


@pytest.mark.parametrize("args, message", [
    (["missing.bin", "out.safetensors"], "SRC 'missing.bin' does not exist"),
    (["{ckpt}", "{ckpt}"], "is the source itself"),
    (["{bin}", "{tmp}/o.safetensors"], "no model config for"),
    (["{ckpt}", "{tmp}/o.safetensors", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["{ckpt}", "{tmp}/o.bin"], "must end with .safetensors"),
    (["{bin}", "{tmp}/o.safetensors", "--config", PHASE2, "--ema"], "has no EMA weights"),
    (["{ckpt}", "{tmp}/o.safetensors", "--ema", "--no-ema"], "not allowed with argument --ema"),
])
def test_user_errors_exit_2_naming_the_problem(tmp_path, capsys, args, message):
    model = build_model(load_config(PHASE2))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    ckpt = tmp_path / "plain.safetensors"
    config = json.dumps({"model": to_container(load_config(PHASE2).model)})
    save_file(state, str(ckpt), metadata={"vwm_config": config})
    torch.save(state, tmp_path / "plain.bin")
    argv = [a.format(ckpt=ckpt, bin=tmp_path / "plain.bin", tmp=tmp_path) for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
