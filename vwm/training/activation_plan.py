"""`use_checkpoint: auto`: checkpoint only the UNet layers that must be, for the memory of the GPU that trains.

Full activation checkpointing recomputes every layer's forward in the backward pass (4 UNet forwards of work per
step instead of 3) to keep about a tenth of the activations; at 576x1024 on an 80 GB GPU it leaves most of the
memory unused. The plan stores the activations of the layers with the most forward FLOPs per stored byte (the deep,
low-resolution layers) until the estimated peak (vwm.training.flops, fitted to measured peaks) reaches the budget,
and checkpoints the rest. The budget is `network_config.params.checkpoint_budget_gib`, else 85 % of the GPU's memory.
Without a GPU and without a budget every layer stays checkpointed, the safe choice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from vwm.models.video_unet import VideoLayer
from vwm.training.flops import DEFAULT_BUDGET_FRACTION, GIB, ActivationPlan, estimate_for_config

log = logging.getLogger(__name__)


def device_budget_gib(device: torch.device | None) -> float | None:
    """85 % of the memory of a CUDA `device`; None for other devices."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return DEFAULT_BUDGET_FRACTION * torch.cuda.get_device_properties(device).total_memory / GIB


def set_stored_layers(unet: nn.Module, stored: frozenset[str]) -> None:
    """Checkpoint every res block and transformer of `unet` except the `stored` ones (module names)."""
    names = {name for name, m in unet.named_modules() if isinstance(m, VideoLayer)}
    unknown = sorted(stored - names)
    if unknown:
        raise ValueError(f"activation plan names layers the UNet does not have: {unknown[:3]}")
    for name, module in unet.named_modules():
        if isinstance(module, VideoLayer):
            module.use_checkpoint = name not in stored


def apply_activation_plan(engine: nn.Module, cfg: Mapping, *, world_size: int, precision: str,
                          device: torch.device | None) -> ActivationPlan | None:
    """Plan and apply `use_checkpoint: auto` to the engine's UNet (built from `cfg`); None, and nothing changed,
    when the config asks for all or no checkpointing, or when there is neither a GPU nor a configured budget."""
    unet = engine.model.diffusion_model
    if getattr(unet, "checkpoint_policy", None) != "auto":
        return None
    budget = unet.checkpoint_budget_gib or device_budget_gib(device)
    if budget is None:
        log.info("activation checkpointing auto: no GPU and no checkpoint_budget_gib, every layer checkpointed")
        return None
    plan = estimate_for_config(cfg, world_size=world_size, precision=precision, budget_gib=budget).plan
    assert plan is not None  # the config's policy is "auto"
    set_stored_layers(unet, plan.stored)
    log.info(plan.describe())
    return plan
