"""`train.py --dry-run`: everything a run checks at start-up (config schema, starting weights, launch, data roots
and annotations), then the resolved config, parameter counts, FLOPs and a calibrated per-GPU memory estimate with
advice, without allocating weights."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from vwm.config import build_model, to_container
from vwm.training.flops import GIB, estimate_for_config, unet_forward_flops
from vwm.training.settings import RunSettings
from vwm.training.preflight import check_data, check_weights_config, describe_loggers, initial_weights, resolve_launch


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
    """Report for --dry-run (the model is built on the meta device; nothing is allocated). Raises what a real run
    would raise at start-up (missing weights or data, bad launch values)."""
    weights = initial_weights(cfg, finetune=opts.finetune, from_scratch=opts.from_scratch, resume=resume)
    weights_note = check_weights_config(weights, cfg.model)
    # Planning usually happens on a machine without the GPUs: assume the GPU default unless told cpu.
    launch = resolve_launch(cfg, accelerator=opts.accelerator, n_devices=opts.n_devices, num_nodes=opts.num_nodes,
                            precision=opts.precision, planning=True)
    data_plan = check_data(cfg)
    model = build_model(cfg, device="meta")
    lines, trainable, frozen, ema = parameter_table(model)
    run = RunSettings.from_config(cfg)
    frames, height, width, batch, strategy = run.num_frames, run.height, run.width, run.batch_size, run.strategy
    network = to_container(cfg.model.params.network_config)
    down = run.latent_downsample
    mem = estimate_for_config(cfg, world_size=launch.world_size, precision=launch.precision, model=model)
    fwd = unet_forward_flops(network, frames, height, width, batch=1, downsample=down)
    checkpointing, compiled = run.use_checkpoint, run.compile_model
    out = [
        "# resolved config",
        OmegaConf.to_yaml(cfg, resolve=True).rstrip(),
        "",
        f"# run directory: {run_dir}" + (f" (resuming {resume})" if resume else ""),
        f"# {weights.describe()}",
        *([f"#   {weights_note}"] if weights_note else []),
        f"# launch: {launch.describe()}; strategy {strategy}",
        *(f"# {line}" for line in data_plan.lines),
        f"# {describe_loggers(cfg)}",
        "# parameters",
        *lines,
        f"# UNet forward per clip ({frames}x{height}x{width}): {fwd / 1e12:.2f} TFLOP; training step model FLOPs "
        f"{3 * fwd * batch / 1e12:.2f} TFLOP per GPU",
        f"# memory estimate per GPU (batch {batch}, activation checkpointing {'auto' if mem.plan is not None else 'on' if checkpointing else 'off'}, "
        f"{'compiled' if compiled else 'eager'} layers; fitted to measured peaks, about +-15 %)",
        *mem.lines(),
        *([f"# {mem.plan.describe()} (the GPU's own memory on a real run; checkpoint_budget_gib sets it)"]
          if mem.plan is not None else []),
    ]
    advice = mem.advice(limit_gib=80.0)
    out += [f"# {line}" for line in advice]
    if mem.total > 80 * GIB and not advice:
        out.append("# warning: the estimate exceeds 80 GiB")
    return "\n".join(out)
