"""Counting what a training step costs: UNet FLOPs (torch's flop counter on the meta device) and memory.

Nothing here allocates real weights: the network is built on the meta device from its config node, so the
full-size counts are cheap on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vwm import actions
from vwm.config import build_model, instantiate, to_container
from vwm.models.video_unet import VideoLayer
from vwm.training.settings import RunSettings, block_first_stage

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
    params = network_node["params"]
    return actions.context_width(params["context_dim"], bool(params.get("action_control")))


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


class _FlashAccounting(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while counting: saves what the fused (flash / memory-efficient)
    kernels keep for backward on a GPU (q, k, v, the output and the log-sum-exp), not the attention matrix that the
    math path used on the meta device would keep."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: ANN001, D102 - autograd.Function protocol
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, D102
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):  # noqa: ANN001
    return _FlashAccounting.apply(q, k, v)


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes the UNet keeps for backward in one training step (meta-device forward, fused attention):
    `checkpointed` with activation checkpointing (the inputs of every checkpointed layer and what lies between
    them), `full` without it, and `largest_layer`, the most one checkpointed layer keeps when it runs without
    checkpointing (what its recomputation materialises again during the backward pass)."""

    checkpointed: int
    full: int
    largest_layer: int
    per_layer: tuple[tuple[str, int], ...] = ()
    """(module name in the UNet, bytes it keeps for backward without checkpointing), in execution order."""


def activation_profile(unet: nn.Module, context_dim: int, frames: int, height: int, width: int, batch: int = 1,
                       dtype: torch.dtype = torch.bfloat16, downsample: int = 8) -> ActivationProfile:
    """Count the saved tensors of one forward of a meta-device UNet (as the engine built it: frozen weights need no
    saved inputs) with and without activation checkpointing."""
    unet = unet.to(dtype)
    layers = [m for m in unet.modules() if isinstance(m, VideoLayer)]
    was = [(m.use_checkpoint, m.__dict__.get("compiled_run")) for m in layers]
    for m in layers:
        m.compiled_run = None  # count the eager layers (the compiled ones keep less: see MEMORY_COEFFICIENTS)
    counts: dict[bool, int] = {}
    per_layer: list[tuple[str, int]] = []
    names = {id(m): name for name, m in unet.named_modules()}
    total = [0]
    x, c_noise, context, y, mask = _meta_inputs(unet, batch, frames, (height // downsample, width // downsample),
                                                context_dim)
    x, context = x.to(dtype).requires_grad_(), context.to(dtype)

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata  # views share their storage: count each storage once
        if key not in seen and not isinstance(t, nn.Parameter):
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    def measured(name: str, forward):  # noqa: ANN001
        def run(*args, **kwargs):  # noqa: ANN002, ANN003
            before = total[0]
            out = forward(*args, **kwargs)
            per_layer.append((name, total[0] - before))
            return out
        return run

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        for checkpointing in (True, False):
            seen: set[int] = set()
            total[0] = 0
            for m in layers:
                m.use_checkpoint = checkpointing
                if not checkpointing:
                    m.video_forward = measured(names[id(m)], type(m).video_forward.__get__(m))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                unet(x, c_noise, context, y.to(dtype) if y is not None else None, mask)
            counts[checkpointing] = total[0]
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for m, (flag, compiled) in zip(layers, was):
            m.use_checkpoint = flag
            m.compiled_run = compiled
            m.__dict__.pop("video_forward", None)
    return ActivationProfile(checkpointed=counts[True], full=counts[False],
                             largest_layer=max((b for _, b in per_layer), default=0), per_layer=tuple(per_layer))


def layer_flops(unet: nn.Module, context_dim: int, frames: int, height: int, width: int, batch: int = 1,
                downsample: int = 8) -> dict[str, float]:
    """Forward FLOPs of each checkpointable layer (res block, transformer) of a meta-device UNet, by module name:
    what activation checkpointing recomputes in the backward pass when that layer is checkpointed."""
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, VideoLayer)}
    counter = FlopCounterMode(display=False)
    out: dict[str, float] = {}

    def counted(name: str, forward):  # noqa: ANN001
        def run(*args, **kwargs):  # noqa: ANN002, ANN003
            before = counter.get_total_flops()
            result = forward(*args, **kwargs)
            out[name] = out.get(name, 0.0) + float(counter.get_total_flops() - before)
            return result
        return run

    inputs = _meta_inputs(unet, batch, frames, (height // downsample, width // downsample), context_dim)
    compiled = {name: m.__dict__.get("compiled_run") for name, m in layers.items()}
    try:
        for name, m in layers.items():
            m.compiled_run = None
            m.video_forward = counted(name, type(m).video_forward.__get__(m))
        with counter, torch.no_grad():
            unet(*inputs)
    finally:
        for name, m in layers.items():
            m.__dict__.pop("video_forward", None)
            m.compiled_run = compiled[name]
    return out


DEFAULT_BUDGET_FRACTION = 0.85
"""`use_checkpoint: auto` plans for this share of the GPU's memory unless `checkpoint_budget_gib` says otherwise:
the rest covers the estimate's error (about +-15 %) and the allocator's fragmentation."""


@dataclass(frozen=True)
class ActivationPlan:
    """Which UNet layers keep their activations (`stored`, by module name) and which are checkpointed (recomputed
    in the backward pass) under `use_checkpoint: auto`, with the estimated activation peak and recomputation."""

    stored: frozenset[str]
    layers: int
    activations: int
    recompute_flops: float
    forward_flops: float
    budget: int

    def describe(self) -> str:
        share = self.recompute_flops / self.forward_flops if self.forward_flops else 0.0
        return (f"activation checkpointing auto: {self.layers - len(self.stored)} of {self.layers} layers "
                f"checkpointed, recomputing {100 * share:.0f} % of the UNet forward FLOPs; planned for a "
                f"{self.budget / GIB:.1f} GiB budget")


def choose_stored_layers(saved: Mapping[str, int], flops: Mapping[str, float], checkpointed: float, full: float,
                         room: float) -> tuple[frozenset[str], float]:
    """Layers that run without checkpointing, most recomputation saved per stored byte first, while the activation
    peak stays within `room` bytes. The peak moves linearly between `checkpointed` (every layer checkpointed) and
    `full` (none) with the share of the layers' saved bytes that are stored, so both ends match the fitted memory
    model. Returns the stored layers and the planned activation peak."""
    total = sum(saved.values())
    if total <= 0:
        return frozenset(), checkpointed
    per_byte = max(full - checkpointed, 0.0) / total
    stored: set[str] = set()
    peak = checkpointed
    for name in sorted(saved, key=lambda n: (flops.get(n, 0.0) / max(saved[n], 1), n), reverse=True):
        extra = saved[name] * per_byte
        if peak + extra <= room:
            stored.add(name)
            peak += extra
    return frozenset(stored), peak


MEMORY_COEFFICIENTS = {
    "checkpointed_saved": 2.9,
    "uncheckpointed_saved": 0.9,
    "vae_bytes_per_pixel": 1024.0,
    "overhead_gib": 0.25,
}
"""Factors of the memory model, fitted to peaks measured on an H100 (`scripts/measure_memory.py`, bf16, ZeRO-2, one
GPU, eager layers; docs/training.md "Memory estimate" lists estimate vs measurement):

- `checkpointed_saved`: the forward/backward peak with activation checkpointing is this many times what the
  checkpointed UNet keeps between layers (the meta-device count of `ActivationProfile.checkpointed`): 2.77-3.03
  over five measured configurations (each layer's recomputation and its gradients come on top of the kept inputs);
- `uncheckpointed_saved`: without checkpointing, the peak is 0.89-0.91 of everything saved (fused attention
  accounting; the earliest tensors are freed while the gradient partition fills);
- `vae_bytes_per_pixel`: the online VAE encode's transient per pixel of a chunk of frames (bf16, 128 channels at full
  resolution, about four tensors alive); below the UNet's peak in every measured configuration, so an upper bound;
- `overhead_gib`: memory held between steps beyond weights, optimizer states and EMA (the batch, cuDNN/cuBLAS
  workspaces): 0.13-0.35 GiB measured.
"""


@dataclass
class MemoryEstimate:
    """Per-GPU memory of a training step, in bytes: what is held between steps, the gradients held during the
    backward pass and the optimizer step, and the transient peaks of the forward/backward pass (activations), of the
    VAE encode and of the optimizer step (fp32 gradients); the peak is the held part plus the largest transient."""

    weights: int
    master_and_optimizer: int
    gradients: int
    ema: int
    activations: int
    step_transient: int = 0
    vae_encode: int = 0
    overhead: int = 0
    checkpointing: bool = True
    plan: "ActivationPlan | None" = None

    @property
    def steady(self) -> int:
        """Held between steps (weights, fp32 master and Adam states, EMA, workspaces)."""
        return self.weights + self.master_and_optimizer + self.ema + self.overhead

    @property
    def total(self) -> int:
        """The peak: held + the largest of forward/backward (activations + gradients), the VAE encode (before the
        UNet, no gradients yet) and the optimizer step (gradients + their fp32 copy)."""
        return self.steady + max(self.activations + self.gradients, self.vae_encode,
                                 self.gradients + self.step_transient)

    def lines(self) -> list[str]:
        """Human-readable breakdown."""
        parts = [("weights", self.weights),
                 ("fp32 master + Adam (ZeRO partition)", self.master_and_optimizer),
                 ("EMA (fp32)", self.ema), ("workspaces, batch", self.overhead),
                 ("gradients (partition + bucket), in bwd", self.gradients),
                 (f"activations, {self._checkpointing_label()}", self.activations),
                 ("VAE encode (transient, before the UNet)", self.vae_encode),
                 ("optimizer step: fp32 gradients", self.step_transient)]
        phase = max((self.activations + self.gradients, "forward/backward"), (self.vae_encode, "VAE encode"),
                    (self.gradients + self.step_transient, "optimizer step"))[1]
        return [f"  {name:<42s} {value / GIB:8.2f} GiB" for name, value in parts] + [
            f"  {'peak (held + largest transient: ' + phase + ')':<42s} {self.total / GIB:8.2f} GiB"]

    def _checkpointing_label(self) -> str:
        if self.plan is not None:
            return f"checkpointing {self.plan.layers - len(self.plan.stored)}/{self.plan.layers} layers"
        return "checkpointed" if self.checkpointing else "no checkpointing"

    def advice(self, limit_gib: float = 80.0) -> list[str]:
        """What would bring the peak under `limit_gib`, biggest lever first. More GPUs shrink only the ZeRO
        partitions (master weights, Adam states, gradients), never the activations, the weights or the EMA."""
        if self.total <= limit_gib * GIB:
            return []
        out = [f"estimated peak {self.total / GIB:.1f} GiB exceeds {limit_gib:.0f} GiB; what would help:"]
        if not self.checkpointing:
            out.append("  - activation checkpointing (model.params.network_config.params.use_checkpoint=true): "
                       f"activations {self.activations / GIB:.1f} GiB -> about a tenth")
        if self.activations > 0.25 * self.total:
            out.append("  - a smaller data.params.batch_size (activations scale with it; keep the global batch with "
                       "lightning.trainer.accumulate_grad_batches) or resolution (target_height/target_width)")
        if self.vae_encode > self.activations:
            out.append("  - fewer frames per VAE call (model.params.en_and_decode_n_samples_a_time) or a latent "
                       "cache (python -m vwm.data.latents build)")
        sharded = self.master_and_optimizer + self.gradients + self.step_transient
        if sharded > 0.25 * self.total:
            out.append(f"  - more GPUs: ZeRO-2 divides the {sharded / GIB:.1f} GiB of fp32 master weights, Adam "
                       "states and gradients by the world size (not the activations, weights or EMA)")
        if self.ema > 0.1 * self.total:
            out.append("  - model.params.use_ema=false saves the EMA's "
                       f"{self.ema / GIB:.1f} GiB (the export then has no EMA weights)")
        return out


def estimate_memory(trainable: int, frozen: int, ema_params: int, world_size: int, activations: int,
                    precision: str = "bf16-mixed", zero_stage: int = 2, *, vae_encode: int = 0,
                    checkpointing: bool = True, bucket_elements: int = 200_000_000) -> MemoryEstimate:
    """Per-GPU bytes under ZeRO-`zero_stage` (0: DDP) for `trainable`/`frozen` parameters, an EMA of `ema_params`,
    `world_size` processes and the given activation and VAE transients. ZeRO-1 shards the fp32 master weights
    and Adam states, ZeRO-2 also the gradients; every rank holds all weights, the EMA and its activations."""
    half = precision.startswith(("bf16", "16")) and "true" not in precision
    weight_bytes = 4 if precision in ("32-true", "32") else 2
    shard = world_size if zero_stage >= 1 else 1
    grad_shard = world_size if zero_stage >= 2 else 1
    master = (4 * trainable if half else 0) + 8 * trainable  # fp32 master copy (mixed) + Adam m, v
    bucket = weight_bytes * bucket_elements if zero_stage >= 1 and trainable > 0 else 0
    return MemoryEstimate(
        weights=weight_bytes * (trainable + frozen),
        master_and_optimizer=master // shard,
        gradients=(weight_bytes * trainable) // grad_shard + min(bucket, weight_bytes * trainable),
        ema=4 * ema_params,
        activations=activations,
        step_transient=(4 * trainable) // grad_shard if half else 0,
        vae_encode=vae_encode,
        overhead=int(MEMORY_COEFFICIENTS["overhead_gib"] * GIB),
        checkpointing=checkpointing,
    )


def estimate_for_config(cfg: Mapping, *, world_size: int, precision: str = "bf16-mixed", model: nn.Module | None = None,
                        budget_gib: float | None = None) -> MemoryEstimate:
    """The per-GPU peak of a training config (its model, data size, checkpointing, compile and ZeRO settings);
    `model` is the config's model built on the meta device (built here when not given). With `use_checkpoint:
    auto` the estimate holds the plan (`.plan`) for `checkpoint_budget_gib`, else `budget_gib` (the GPU's memory),
    else 85 % of 80 GiB."""
    if model is None:
        model = build_model(cfg, device="meta")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    ema = sum(b.numel() for b in model.model_ema.buffers()) if getattr(model, "model_ema", None) is not None else 0
    data = dict(to_container(OmegaConf.select(cfg, "data.params")) or {})
    model_params = dict(to_container(OmegaConf.select(cfg, "model.params")) or {})
    network = model_params["network_config"]
    run = RunSettings.from_config(cfg)
    frames, height, width, batch, down = run.num_frames, run.height, run.width, run.batch_size, run.latent_downsample
    policy = network["params"].get("use_checkpoint")
    checkpointing = run.use_checkpoint
    half = precision.startswith(("bf16", "16"))
    unet = model.model.diffusion_model
    profile = activation_profile(unet, context_width(network), frames, height, width, batch,
                                 dtype=torch.bfloat16 if half else torch.float32, downsample=down)
    coef = MEMORY_COEFFICIENTS
    # Compiled layers are estimated as eager ones: the one compiled measurement with a comparable eager one
    # (320x576, phase 2) gave the same peak (docs/training.md, "Memory estimate").
    all_checkpointed = coef["checkpointed_saved"] * profile.checkpointed
    activations = all_checkpointed if checkpointing else coef["uncheckpointed_saved"] * profile.full
    chunk = min(int(model_params.get("en_and_decode_n_samples_a_time") or frames), frames * batch)
    cached = all(isinstance(s, Mapping) and str(s.get("target", "")).endswith("LatentCacheSubset")
                 for s in data.get("subsets") or [None])
    vae = 0 if cached or block_first_stage(model_params.get("first_stage_config") or {}) else int(
        coef["vae_bytes_per_pixel"] * chunk * height * width * (1 if half else 2))  # fp32 VAE: twice the bytes
    zero = run.zero_stage or 0
    bucket = int((to_container(OmegaConf.select(cfg, "lightning.deepspeed")) or {}).get(
        "reduce_bucket_size", 200_000_000))
    estimate = estimate_memory(trainable, frozen, ema, world_size, int(activations), precision=precision,
                               zero_stage=zero, vae_encode=vae, checkpointing=checkpointing, bucket_elements=bucket)
    if policy == "auto":
        limit = network["params"].get("checkpoint_budget_gib") or budget_gib or DEFAULT_BUDGET_FRACTION * 80.0
        budget = int(float(limit) * GIB)
        flops = layer_flops(unet, context_width(network), frames, height, width, batch, downsample=down)
        saved = dict(profile.per_layer)
        room = budget - estimate.steady - estimate.gradients
        stored, peak = choose_stored_layers(saved, flops, all_checkpointed,
                                            coef["uncheckpointed_saved"] * profile.full, room)
        estimate.activations = int(peak)
        estimate.plan = ActivationPlan(stored=stored, layers=len(saved), activations=int(peak),
                                       recompute_flops=sum(f for n, f in flops.items() if n not in stored),
                                       forward_flops=float(sum(flops.values())), budget=budget)
    return estimate
