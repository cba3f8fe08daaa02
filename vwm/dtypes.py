"""dtype names and helpers shared by export, the latent cache and the models."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

DtypeName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Storage dtypes by the names the CLIs accept (`bin_to_st.py --dtype`, `vwm.data.latents build --dtype`)."""


def module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """dtype of a module's first parameter (`default` for parameter-free modules)."""
    param = next(module.parameters(), None)
    return default if param is None else param.dtype


def outside_autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on `device` when `enabled` (the reference's `disable_*_autocast`
    switches: the module then computes in its weights' dtype), else one that changes nothing."""
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()
