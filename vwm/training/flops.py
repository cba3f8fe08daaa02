"""Counting what a training step costs: UNet FLOPs (torch's flop counter on the meta device) and memory.

Nothing here allocates real weights: the network is built on the meta device from its config node, so the
full-size counts are cheap on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vwm.config import instantiate

GIB = 1024**3

PEAK_TFLOPS = {"h100": 989.4, "h200": 989.4, "a100": 312.0}
"""Dense bf16 tensor-core peak per GPU (TFLOP/s) used for MFU."""


def peak_tflops(device: torch.device | None = None) -> float:
    """Peak bf16 TFLOP/s of the current CUDA device (H100 value when unknown)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device).lower()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return PEAK_TFLOPS["h100"]


def _meta_inputs(unet: nn.Module, batch: int, frames: int, latent_hw: tuple[int, int], context_dim: int):
    h, w = latent_hw
    x = torch.zeros(batch, frames, unet.in_channels, h, w, device="meta")
    c_noise = torch.zeros(batch, frames, device="meta")
    context = torch.zeros(batch, 1, context_dim, device="meta")
    y = torch.zeros(batch, unet.label_emb[0][0].in_features, device="meta") if unet.num_classes else None
    mask = torch.zeros(batch, frames, device="meta")
    return x, c_noise, context, y, mask


def context_width(network_node: Mapping) -> int:
    """Cross-attention context width the network expects (CLIP width, plus the action columns when enabled)."""
    from vwm.actions import ACTION_CONTEXT_DIM

    params = network_node["params"]
    return int(params["context_dim"]) + (ACTION_CONTEXT_DIM if params.get("action_control") else 0)


def latent_downsample(model_node: Mapping) -> int:
    """Pixels per latent side of the model's first stage (8 for the SD/SVD VAE, `patch` for PixelShuffle)."""
    stage = (model_node.get("params") or {}).get("first_stage_config") or {}
    params = stage.get("params") or {}
    if "patch" in params or str(stage.get("target", "")).endswith("PixelShuffleAutoencoder"):
        return int(params.get("patch", 4))
    encoder = (params.get("encoder_config") or {}).get("params") or {}
    return 2 ** (len(encoder.get("ch_mult", [1, 2, 4, 4])) - 1)


def unet_forward_flops(network_node: Mapping, frames: int, height: int, width: int, batch: int = 1,
                       downsample: int = 8) -> float:
    """FLOPs of one UNet forward pass for `batch` clips of `frames` x `height` x `width` pixels."""
    with torch.device("meta"):
        unet = instantiate(network_node)
    inputs = _meta_inputs(unet, batch, frames, (height // downsample, width // downsample), context_width(network_node))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(*inputs)
    return float(counter.get_total_flops())


@dataclass
class MemoryEstimate:
    """Per-GPU memory of a training run, in bytes."""

    weights: int
    master_and_optimizer: int
    gradients: int
    ema: int
    activations: int

    @property
    def total(self) -> int:
        """Sum of the parts."""
        return self.weights + self.master_and_optimizer + self.gradients + self.ema + self.activations

    def lines(self) -> list[str]:
        """Human-readable breakdown."""
        parts = [("weights", self.weights), ("fp32 master + Adam (ZeRO-2 partition)", self.master_and_optimizer),
                 ("gradients (partition)", self.gradients), ("EMA (fp32)", self.ema),
                 ("activations saved for backward", self.activations)]
        return [f"  {name:<40s} {value / GIB:8.2f} GiB" for name, value in parts] + [
            f"  {'total (+ allocator overhead, buckets)':<40s} {self.total / GIB:8.2f} GiB"]


def activation_bytes(network_node: Mapping, frames: int, height: int, width: int, batch: int = 1,
                     dtype: torch.dtype = torch.bfloat16, checkpointing: bool | None = None,
                     downsample: int = 8) -> int:
    """Bytes of tensors the UNet saves for backward on one step (meta-device forward with saved-tensor hooks)."""
    node = {**network_node, "params": dict(network_node["params"])}
    if checkpointing is not None:
        node["params"]["use_checkpoint"] = checkpointing
    with torch.device("meta"):
        unet = instantiate(node).to(dtype)
    x, c_noise, context, y, mask = _meta_inputs(unet, batch, frames, (height // downsample, width // downsample),
                                                context_width(node))
    x, context = x.to(dtype).requires_grad_(), context.to(dtype)
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal total
        storage = t.untyped_storage()
        key = storage._cdata  # views share their storage: count each storage once
        if key not in seen and not isinstance(t, nn.Parameter):
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, c_noise, context, y.to(dtype) if y is not None else None, mask)
    return total


def estimate_memory(trainable: int, frozen: int, ema_params: int, world_size: int, activations: int,
                    precision: str = "bf16-mixed", zero_stage: int = 2) -> MemoryEstimate:
    """Per-GPU bytes for weights, optimizer, gradients and EMA under ZeRO (or DDP when zero_stage=0)."""
    half = precision.startswith(("bf16", "16"))
    weight_bytes = 2 if half else 4
    shard = world_size if zero_stage >= 1 else 1
    grad_shard = world_size if zero_stage >= 2 else 1
    master = (4 * trainable if half else 0) + 8 * trainable  # fp32 master copy (mixed) + Adam m, v
    return MemoryEstimate(
        weights=weight_bytes * (trainable + frozen),
        master_and_optimizer=master // shard,
        gradients=(4 * trainable) // grad_shard,
        ema=4 * ema_params,
        activations=activations,
    )
