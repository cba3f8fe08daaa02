"""Measure the GPU memory of real training steps, split the way `train.py --dry-run` estimates it, to calibrate
`vwm.training.flops.estimate_memory` (docs/training.md, "Memory estimate").

One configuration per process (a fresh CUDA allocator): the real Lightning trainer and strategy (DeepSpeed ZeRO-2,
bf16) on synthetic in-memory batches from random weights. For a step after the warm-up it records the memory held
between steps (`steady_gib`: weights, fp32 master and Adam states, EMA, gradient buffers), the peak of the forward
and backward pass and the peak of the optimizer step, and prints one JSON line with the dry run's estimate beside it.

    python scripts/measure_memory.py --config configs/training/vista_phase1.yaml --height 576 --width 1024
    python scripts/measure_memory.py --all        # the calibration set, one subprocess each
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CALIBRATION_SET = [
    ["--config", "configs/training/vista_phase1.yaml", "--height", "576", "--width", "1024"],
    ["--config", "configs/training/vista_phase1.yaml", "--height", "320", "--width", "576"],
    ["--config", "configs/training/vista_phase2_stage1.yaml", "--height", "320", "--width", "576"],
    ["--config", "configs/training/vista_phase2_stage2.yaml", "--height", "576", "--width", "1024"],
    ["--config", "configs/training/vista_phase2_stage1.yaml", "--height", "320", "--width", "576", "--checkpointing",
     "off", "--latents"],
    ["--config", "configs/training/vista_phase1.yaml", "--height", "320", "--width", "576", "--checkpointing", "off",
     "--latents"],
    ["--config", "configs/training/vista_phase2_stage1.yaml", "--height", "320", "--width", "576", "--batch", "4"],
]
"""Configurations measured for the calibration (eager; compile_model adds its own, smaller, activation peak)."""

GIB = 1024**3


def measure(args: argparse.Namespace) -> dict:
    """Run the steps of one configuration and return the measured and estimated memory."""
    import vwm  # noqa: F401  (torchvision shim first)
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    from vwm.actions import ACTION_FEATURES, ACTION_KEYS
    from vwm.config import build_model, load_config, to_container
    from vwm.training.dry_run import parameter_table
    from vwm.training.strategy import build_strategy

    overrides = [f"model.params.compile_model={args.compile}", *args.overrides,
                 f"data.params.target_height={args.height}", f"data.params.target_width={args.width}",
                 f"data.params.batch_size={args.batch}"]
    if args.checkpointing != "config":
        value = "auto" if args.checkpointing == "auto" else args.checkpointing == "on"
        overrides.append(f"model.params.network_config.params.use_checkpoint={value}")
    cfg = load_config(args.config, overrides)
    frames = int(cfg.model.params.num_frames)

    class Clips(Dataset):
        def __len__(self) -> int:
            return 1000

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            frame0 = torch.rand(3, args.height, args.width, generator=g) * 2 - 1
            item = {"cond_frames_without_noise": frame0, "cond_frames": frame0.clone(),
                    "cond_aug": torch.tensor(0.0), "fps_id": torch.tensor(9.0),
                    "motion_bucket_id": torch.tensor(127.0),
                    "action_mask": torch.ones(len(ACTION_KEYS), dtype=torch.bool)}
            if args.latents:
                item["latents"] = torch.randn(frames, 4, args.height // 8, args.width // 8, generator=g)
            else:
                item["img_seq"] = torch.rand(frames, 3, args.height, args.width, generator=g) * 2 - 1
            for key in ACTION_KEYS:
                item[key] = torch.randn(ACTION_FEATURES[key], generator=g)
            return item

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[dict] = []
            self._row: dict = {}
            self.vae_extra_gib: float | None = None

        def on_train_start(self, trainer, pl_module):
            if args.latents:
                return
            x = torch.rand(args.batch, frames, 3, args.height, args.width, device="cuda") * 2 - 1
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pl_module.encode_first_stage(x, generator=torch.Generator(device="cuda").manual_seed(0))
            torch.cuda.synchronize()
            self.vae_extra_gib = (torch.cuda.max_memory_allocated() - base) / GIB

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.synchronize()
            self._row = {"step": trainer.global_step, "steady_gib": torch.cuda.memory_allocated() / GIB}
            torch.cuda.reset_peak_memory_stats()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            torch.cuda.synchronize()
            self._row["fwd_bwd_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            self._row["after_bwd_gib"] = torch.cuda.memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self._row["step_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            self.rows.append(self._row)

    model = build_model(cfg, device="cuda")
    from vwm.training.activation_plan import apply_activation_plan, device_budget_gib

    plan = apply_activation_plan(model, cfg, world_size=1, precision="bf16-mixed", device=torch.device("cuda"))
    model.learning_rate = float(cfg.model.get("base_learning_rate", 1e-5))
    _, trainable, frozen, ema = parameter_table(model)
    lightning = to_container(cfg.get("lightning")) or {}
    strategy = build_strategy("deepspeed_stage_2", lightning)
    strategy.config["train_micro_batch_size_per_gpu"] = args.batch
    probe = Probe()
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed",
                         max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[probe], gradient_clip_val=0.3, benchmark=False)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=DataLoader(Clips(), batch_size=args.batch, num_workers=2))
    rows = probe.rows[2:] or probe.rows
    worst = max(rows, key=lambda r: max(r["fwd_bwd_peak_gib"], r["step_peak_gib"]))
    try:
        from vwm.training.flops import estimate_for_config
    except ImportError:  # before the calibrated estimate existed
        estimate_gib = None
    else:
        estimate_gib = round(estimate_for_config(cfg, world_size=1, precision="bf16-mixed",
                                                 budget_gib=device_budget_gib(torch.device("cuda"))).total / GIB, 2)
    return {
        "config": args.config, "resolution": f"{frames}x{args.height}x{args.width}", "batch": args.batch,
        "checkpointing": cfg.model.params.network_config.params.get("use_checkpoint"),
        "stored_layers": None if plan is None else f"{len(plan.stored)}/{plan.layers}",
        "latents": args.latents, "compile": args.compile,
        "trainable_M": round(trainable / 1e6, 1), "frozen_M": round(frozen / 1e6, 1), "ema_M": round(ema / 1e6, 1),
        "steady_gib": round(worst["steady_gib"], 2), "fwd_bwd_peak_gib": round(worst["fwd_bwd_peak_gib"], 2),
        "after_bwd_gib": round(worst["after_bwd_gib"], 2), "step_peak_gib": round(worst["step_peak_gib"], 2),
        "peak_gib": round(max(worst["fwd_bwd_peak_gib"], worst["step_peak_gib"]), 2),
        "estimate_gib": estimate_gib,
        "vae_encode_extra_gib": None if probe.vae_extra_gib is None else round(probe.vae_extra_gib, 2),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config")
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--latents", action="store_true", help="precomputed latents (no online VAE encode)")
    p.add_argument("--checkpointing", choices=["config", "on", "off", "auto"], default="config")
    p.add_argument("--compile", action="store_true", help="compile_model=True (default: eager)")
    p.add_argument("--all", action="store_true", help="measure the calibration set, one subprocess each")
    p.add_argument("overrides", nargs="*", help="a.b=c config overrides")
    args = p.parse_args()
    if args.all:
        for extra in CALIBRATION_SET:
            result = subprocess.run([sys.executable, os.path.abspath(__file__), *extra], capture_output=True,
                                    text=True)
            line = (result.stdout.strip().splitlines() or [""])[-1]
            print(line if line.startswith("{") else json.dumps({"args": extra, "error": result.stderr[-1500:]}),
                  flush=True)
        return
    if not args.config:
        p.error("--config is required without --all")
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
