"""The model of a sampling run: its config (given, embedded in the checkpoint, or recognised from the tensor
layout of a config-less release), built and loaded strictly with the EMA weights."""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from vwm.checkpoint import load_weights, read_config_metadata, read_state_dict
from vwm.config import build_model, load_config, resolve_aliases, validate
from vwm.defaults import NUM_FRAMES
from vwm.models.engine import DiffusionEngine
from vwm.resources import find_config
from vwm.sampling.options import SampleOptions

log = logging.getLogger(__name__)

LAYOUT_CONFIGS = ("configs/inference/vista.yaml", "configs/inference/svd_xt.yaml", "configs/tiny/model.yaml")
"""Shipped model configs tried, in order, for a checkpoint that embeds none (the released vista.safetensors,
svd_xt.safetensors): the first whose tensor names and shapes the checkpoint matches exactly is used."""


def model_config(opts: SampleOptions) -> tuple[DictConfig, str]:
    """(model config, where it came from): --config, else the config embedded in a vwm safetensors export."""
    if opts.config:
        return load_config(opts.config), "--config " + " ".join(opts.config)
    embedded = None
    if opts.ckpt.endswith(".safetensors") and os.path.isfile(opts.ckpt):
        with safe_open(opts.ckpt, framework="pt", device="cpu") as f:
            embedded = read_config_metadata(f.metadata() or {})
    if embedded is None:
        return layout_config(opts.ckpt)
    cfg = OmegaConf.create(embedded)
    resolve_aliases(cfg)
    validate(cfg)
    return cfg, f"embedded in {opts.ckpt}"


def layout_config(ckpt: str) -> tuple[DictConfig, str]:
    """The shipped config (LAYOUT_CONFIGS) whose tensor names and shapes a config-less checkpoint matches, as for
    the released vista.safetensors; an error naming --config otherwise."""
    shapes = None
    if ckpt.endswith(".safetensors") and os.path.isfile(ckpt):
        with safe_open(ckpt, framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    tried = []
    for name in LAYOUT_CONFIGS if shapes is not None else ():
        path = find_config(name)
        if not os.path.isfile(path):
            continue
        cfg = load_config(path)
        expected = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()
                    if not k.startswith("model_ema.")}
        if expected == shapes:
            log.warning("--ckpt %s carries no config; its tensors match %s exactly: using it (--config chooses "
                        "another)", ckpt, name)
            return cfg, f"{name} (matches the layout of {ckpt})"
        tried.append(name)
    raise ValueError(f"--ckpt={ckpt!r} carries no model config (safetensors metadata 'vwm_config', written by "
                     "bin_to_st.py)" + (f" and matches none of {tried}" if tried else "") +
                     "; pass --config with the model config it was trained with, e.g. "
                     "--config configs/inference/vista.yaml")


def configured_frames(cfg: DictConfig) -> int:
    """The model's num_frames from its config (the DiffusionEngine default, NUM_FRAMES, when the config omits it)."""
    return int((cfg["model"].get("params") or {}).get("num_frames", NUM_FRAMES))


def load_model(opts: SampleOptions, cfg: DictConfig) -> DiffusionEngine:
    """Build the model of `cfg` on the CPU and load the checkpoint strictly (EMA weights when present)."""
    state, _ = read_state_dict(opts.ckpt)
    if cfg.model.params.get("compile_model"):
        cfg.model.params.compile_model = False  # a training setting (exports embed it); see --compile
    model = build_model(cfg)
    load_weights(model, state, allow_missing=(), use_ema_weights=True, name=opts.ckpt)
    return model


def describe_model(cfg: DictConfig, opts: SampleOptions, device: torch.device) -> dict:
    """Parameter counts (built on the meta device) and the weight memory the device holds at once."""
    meta = build_model(cfg, device="meta")
    counts = {name: sum(p.numel() for p in getattr(meta, name).parameters())
              for name in ("model", "conditioner", "first_stage_model")}
    unet_bytes = 2 if device.type == "cuda" else 4
    weight_bytes = [counts["model"] * unet_bytes, counts["conditioner"] * 4, counts["first_stage_model"] * 4]
    held = max(weight_bytes) if opts.low_vram else sum(weight_bytes)
    return {"parameters": counts, "weights_gib_on_device": round(held / 2**30, 3)}
