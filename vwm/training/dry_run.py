"""`train.py --dry-run`: the resolved config, parameter counts and a per-GPU memory estimate, without weights."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from vwm.config import build_model, to_container
from vwm.training.flops import GIB, activation_bytes, estimate_memory, latent_downsample, unet_forward_flops


def parameter_table(model) -> tuple[list[str], int, int, int]:
    """Lines of trainable/frozen parameter counts per top-level module, plus totals and EMA size."""
    lines, trainable_total, frozen_total = [], 0, 0
    for name, module in model.named_children():
        if name == "model_ema":
            continue
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        if trainable or frozen:
            lines.append(f"  {name:<20s} trainable {trainable / 1e6:10.2f} M   frozen {frozen / 1e6:10.2f} M")
        trainable_total += trainable
        frozen_total += frozen
    ema = sum(b.numel() for b in model.model_ema.buffers()) if getattr(model, "model_ema", None) is not None else 0
    lines.append(f"  {'total':<20s} trainable {trainable_total / 1e6:10.2f} M   frozen {frozen_total / 1e6:10.2f} M"
                 f"   EMA {ema / 1e6:.2f} M")
    return lines, trainable_total, frozen_total, ema


def describe(cfg: DictConfig, opts, run_dir: str, resume: str | None) -> str:
    """Report for --dry-run (the model is built on the meta device; nothing is allocated)."""
    from vwm.training.run import resolve_devices

    model = build_model(cfg, device="meta")
    lines, trainable, frozen, ema = parameter_table(model)
    data = dict(to_container(cfg.data.get("params")) or {})
    frames = int(cfg.model.params.get("num_frames", 25))
    height, width = int(data.get("target_height", 320)), int(data.get("target_width", 576))
    batch = int(data.get("batch_size", 1))
    devices = resolve_devices(opts)
    world = devices * opts.num_nodes
    # Planning usually happens on a machine without the GPUs: assume the GPU default unless told --accelerator cpu.
    precision = opts.precision or ("32-true" if opts.accelerator == "cpu" else "bf16-mixed")
    strategy = str(OmegaConf.select(cfg, "lightning.trainer.strategy") or "auto")
    zero = int(strategy.rsplit("_", 1)[-1]) if strategy.startswith("deepspeed") and strategy[-1].isdigit() else 0
    network = to_container(cfg.model.params.network_config)
    down = latent_downsample(to_container(cfg.model))
    acts = activation_bytes(network, frames, height, width, batch=batch, downsample=down)
    mem = estimate_memory(trainable, frozen, ema, world, acts, precision=precision, zero_stage=zero)
    fwd = unet_forward_flops(network, frames, height, width, batch=1, downsample=down)
    out = [
        "# resolved config",
        OmegaConf.to_yaml(cfg, resolve=True).rstrip(),
        "",
        f"# run directory: {run_dir}" + (f" (resuming {resume})" if resume else ""),
        f"# {world} process(es) = {opts.num_nodes} node(s) x {devices} device(s); strategy {strategy}; "
        f"precision {precision}",
        "# parameters",
        *lines,
        f"# UNet forward per clip ({frames}x{height}x{width}): {fwd / 1e12:.2f} TFLOP; training step model FLOPs "
        f"{3 * fwd * batch / 1e12:.2f} TFLOP per GPU",
        f"# memory estimate per GPU (batch {batch}, activation checkpointing "
        f"{'on' if network['params'].get('use_checkpoint') else 'off'})",
        *mem.lines(),
    ]
    if mem.total > 80 * GIB:
        out.append("# warning: estimate exceeds 80 GiB; enable use_checkpoint, lower the resolution or add GPUs")
    return "\n".join(out)
