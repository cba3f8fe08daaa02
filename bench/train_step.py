"""Time full training steps of a config at a resolution; print one JSON line per configuration.

A step is what `train.py` runs: the real Lightning trainer and strategy (DeepSpeed ZeRO-2, bf16 by default), the
engine's training_step (VAE encode unless latents are given, conditioner, loss, backward), the optimizer step and
the EMA update, on a synthetic in-memory batch (random pixels or random latents), from random weights.

    python bench/train_step.py --config configs/training/vista_phase2_stage1.yaml --height 320 --width 576
    python bench/train_step.py --config configs/training/vista_phase1.yaml --height 576 --width 1024 --latents

Reports step time (median/min/max over the timed steps, after warm-up), clips/s, the UNet forward TFLOP per clip
(torch's flop counter on the meta device), model TFLOP per step (3x forward), MFU against --peak-tflops and the
peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vwm  # noqa: E402,F401  (torchvision shim first)
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from vwm.actions import ACTION_FEATURES, ACTION_KEYS  # noqa: E402
from vwm.config import build_model, load_config, to_container  # noqa: E402
from vwm.training.activation_plan import apply_activation_plan  # noqa: E402
from vwm.training.flops import GIB, unet_forward_flops  # noqa: E402
from vwm.training.strategy import build_strategy  # noqa: E402


class SyntheticClips(Dataset):
    """Random clips in the batch contract (pixels in [-1, 1] or ready latents), all actions visible."""

    def __init__(self, frames: int, height: int, width: int, latents: bool, length: int):
        self.shape = (frames, 3, height, width)
        self.latents = latents
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        t, _, h, w = self.shape
        frame0 = torch.rand(3, h, w, generator=g) * 2 - 1
        item = {
            "cond_frames_without_noise": frame0, "cond_frames": frame0.clone(),
            "cond_aug": torch.tensor(0.0), "fps_id": torch.tensor(9.0), "motion_bucket_id": torch.tensor(127.0),
            "action_mask": torch.ones(len(ACTION_KEYS), dtype=torch.bool),
        }
        if self.latents:
            item["latents"] = torch.randn(t, 4, h // 8, w // 8, generator=g)
        else:
            item["img_seq"] = torch.rand(*self.shape, generator=g) * 2 - 1
        for key in ACTION_KEYS:
            item[key] = torch.randn(ACTION_FEATURES[key], generator=g)
        return item


class StepTimer(pl.Callback):
    """Wall time of every optimizer step, synchronised with the GPU; optionally profiles one step after warm-up."""

    def __init__(self, profile_step: int | None = None, profile_path: str | None = None):
        self.times: list[float] = []
        self.losses: list[float] = []
        self._t = None
        self.profile_step, self.profile_path = profile_step, profile_path
        self._prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync()
        if batch_idx == self.profile_step:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA])
            self._prof.__enter__()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        self.times.append(time.perf_counter() - self._t)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()))
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            table = self._prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
            summary = kernel_summary(self._prof, self.times[-1])
            with open(self.profile_path, "w") as f:
                f.write(table + "\n" + json.dumps(summary, indent=1) + "\n")
            print(json.dumps({"profile": summary["categories_ms"], "kernel_ms": summary["kernel_ms"],
                              "step_ms": summary["step_ms"]}), flush=True)
            self._prof = None


class RegionTimer(pl.Callback):
    """Where each step's time goes on the GPU's timeline: a CUDA event (a clock reading on the CPU) at the edges of
    the conditioner, the online VAE encode, the UNet's forward, the backward, the optimizer's hooks, DeepSpeed's
    step and the EMA, inside the real Lightning + DeepSpeed step. Each segment between two consecutive marks is
    named after them ("encode" for encode> .. <encode, "<encode .. unet>" for the loss code between the two); the
    medians over the timed steps add up to the step. A segment holds the GPU work queued in it, plus any time the
    GPU waited for the host there."""

    def __init__(self, skip: int):
        self.skip, self.steps, self._marks = skip, [], None
        self._cuda = torch.cuda.is_available()

    def mark(self, name: str) -> None:
        if self._marks is None:
            return
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((name, event))
        else:
            self._marks.append((name, time.perf_counter()))

    def _wrap(self, owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            self.mark(name + ">")
            try:
                return inner(*args, **kwargs)
            finally:
                self.mark("<" + name)

        setattr(owner, attr, wrapped)

    def _hooks(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.mark(name + ">"))
        module.register_forward_hook(lambda *_: self.mark("<" + name))

    def on_train_start(self, trainer, pl_module):
        self._wrap(pl_module, "encode_first_stage", "encode")
        self._hooks(pl_module.conditioner, "conditioner")
        self._hooks(pl_module.model, "unet_forward")
        if getattr(pl_module, "use_ema", False):
            self._hooks(pl_module.model_ema, "ema")
        if hasattr(trainer.model, "step") and hasattr(trainer.model, "zero_optimization"):  # DeepSpeed's engine
            self._wrap(trainer.model, "step", "deepspeed_step")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._marks = []
        self.mark("step>")

    def on_before_backward(self, trainer, pl_module, loss):
        self.mark("backward>")

    def on_after_backward(self, trainer, pl_module):
        self.mark("<backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.mark("grads_ready")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mark("<step")
        if self._cuda:
            torch.cuda.synchronize()
        marks, self._marks = self._marks, None
        segments: dict[str, float] = {}
        for (a, ta), (b, tb) in zip(marks, marks[1:]):
            ms = ta.elapsed_time(tb) if self._cuda else (tb - ta) * 1e3
            name = a[:-1] if a.endswith(">") and b == "<" + a[:-1] else f"{a} .. {b}"
            segments[name] = segments.get(name, 0.0) + ms
        self.steps.append(segments)

    def summary(self) -> dict[str, float]:
        """Median milliseconds per segment over the steps after `skip`, in the order of the last step."""
        steps = self.steps[self.skip:]
        if not steps:
            return {}
        return {name: round(statistics.median(s.get(name, 0.0) for s in steps), 2) for name in steps[-1]}


KERNEL_CATEGORIES = (  # first match wins; lower-case substrings of CUDA kernel names
    ("compiled", ("triton_",)),  # Inductor's fused kernels (compile_model)
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("groupnorm", ("group_norm", "groupnorm")),
    ("layernorm", ("layer_norm", "layernorm")),
    ("conv", ("conv", "dgrad", "wgrad", "fprop", "implicit")),
    ("gemm", ("gemm", "cutlass", "cublas", "xmma", "nvjet")),
    ("optimizer", ("multi_tensor", "adam")),
    ("copy_cat", ("copy", "memcpy", "cat", "memset", "transpose")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton")),
)


def parse_inductor_options(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings (`triton.mix_order_reduction=True`) as Inductor options, values read as YAML scalars."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--inductor-option wants KEY=VALUE, got {pair!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def kernel_summary(prof, step_s: float) -> dict:
    """GPU kernel time of one profiled step by category, the 25 costliest kernels, and the step's wall time: when
    the kernel total is well below the wall time the step is launch- or host-bound."""
    cats: dict[str, float] = {}
    kernels: dict[str, list[float]] = {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.device_time / 1e3 if hasattr(evt, "device_time") else evt.cuda_time / 1e3
        name = evt.name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
        entry = kernels.setdefault(evt.name[:120], [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {"step_ms": round(step_s * 1e3, 1), "kernel_ms": round(sum(cats.values()), 1),
            "categories_ms": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n, "ms": round(v[0], 2), "calls": v[1]} for n, v in top]}


def time_vae_encode(model, frames: int, height: int, width: int, reps: int = 3) -> float:
    """Median seconds of the online VAE encode of one clip (the first stage, bf16 autocast), as in a step."""
    model.first_stage_model.cuda()  # Lightning moves the module back to the CPU at the end of fit
    x = torch.rand(1, frames, 3, height, width, device="cuda") * 2 - 1
    out = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(reps + 1):
            _sync()
            t = time.perf_counter()
            model.encode_first_stage(x, generator=torch.Generator(device="cuda").manual_seed(0))
            _sync()
            out.append(time.perf_counter() - t)
    return statistics.median(out[1:])


class HostProfile(pl.Callback):
    """cProfile of the host (Python) side of the timed steps: when the GPU waits for the CPU, this says where the
    CPU time goes. Writes the top functions by own time and by cumulative time."""

    def __init__(self, start_step: int, path: str):
        import cProfile

        self.start_step, self.path, self.prof = start_step, path, cProfile.Profile()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.start_step:
            self.prof.enable()

    def on_train_end(self, trainer, pl_module):
        import io
        import pstats

        self.prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(self.prof, stream=out)
        stats.sort_stats("tottime").print_stats(45)
        stats.sort_stats("cumulative").print_stats(60)
        with open(self.path, "w") as f:
            f.write(out.getvalue())


def adam_form(trainer: pl.Trainer) -> str | None:
    """"fused", "foreach" or "default" (torch picks): the implementation the run's torch optimizer was built with."""
    if not trainer.optimizers:
        return None
    opt = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])  # inside DeepSpeed's ZeRO wrapper
    defaults = getattr(opt, "defaults", {})
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "default"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--frames", type=int, default=None, help="default: the model's num_frames")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--latents", action="store_true", help="precomputed latents (no online VAE encode)")
    p.add_argument("--strategy", default="deepspeed_stage_2")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--checkpointing", choices=["config", "on", "off", "auto"], default="config",
                   help="activation checkpointing: the config's, every layer, none, or planned for the GPU's memory")
    p.add_argument("--peak-tflops", type=float, default=989.4)
    p.add_argument("--accelerator", default="gpu", help="cpu only to smoke-test the script on a tiny config")
    p.add_argument("--profile", metavar="FILE", help="write a profiler table of the first step after warm-up")
    p.add_argument("--host-profile", metavar="FILE", help="cProfile the timed steps' host side into FILE")
    p.add_argument("--benchmark", choices=["config", "on", "off"], default="config", help="cudnn.benchmark")
    p.add_argument("--conv3d", action="store_true", help="A/B: temporal convs as cuDNN 3-D convolutions")
    p.add_argument("--zero-init", action="store_true",
                   help="keep the zero-initialised layers at zero (as a model trained from scratch starts); by "
                        "default they get random values, as in fine-tuning a pretrained model, so every trainable "
                        "weight gets a gradient from the first step (and compile_model's gradient check can tell)")
    p.add_argument("--deepspeed-stock", action="store_true",
                   help="A/B: DeepSpeed's own optimizer step as vwm ran it until 2026-12-07 (its bf16 overflow check, "
                        "its per-tensor gradient norm) and torch's default (foreach) AdamW, instead of vwm's "
                        "(vwm/training/zero_step.py, fused AdamW on CUDA)")
    p.add_argument("overrides", nargs="*", help="a.b=c config overrides")
    args = p.parse_args()

    overrides = list(args.overrides)
    if args.deepspeed_stock:
        overrides += ["model.params.optimizer_config.target=torch.optim.AdamW",  # Vista's (and vwm's default)
                      "model.params.optimizer_config.params.foreach=True"]
    if args.checkpointing != "config":
        value = "auto" if args.checkpointing == "auto" else args.checkpointing == "on"
        overrides.append(f"model.params.network_config.params.use_checkpoint={value}")
    overrides += [f"data.params.target_height={args.height}", f"data.params.target_width={args.width}",
                  f"data.params.batch_size={args.batch}"]  # what the activation plan is made for
    cfg = load_config(args.config, overrides)
    frames = args.frames or int(cfg.model.params.num_frames)
    network = to_container(cfg.model.params.network_config)
    fwd = unet_forward_flops(network, frames, args.height, args.width)
    if args.conv3d:
        import vwm.models.vae_networks as ae
        import vwm.models.video_unet as unet

        def conv3d(c_in, c_out, kernel_size, padding=0):
            return torch.nn.Conv3d(c_in, c_out, kernel_size, padding=padding)

        unet.temporal_conv = ae.temporal_conv = conv3d
    model = build_model(cfg, device="cuda" if args.accelerator == "gpu" else None)
    if not args.zero_init:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from sample import randomize_zero_weights  # bench/sample.py

        randomize_zero_weights(model.model)
        if model.use_ema:
            model.model_ema.reset(model.model)
    plan = apply_activation_plan(model, cfg, world_size=1, precision=args.precision,
                                 device=torch.device("cuda") if args.accelerator == "gpu" else None)
    model.learning_rate = float(cfg.model.get("base_learning_rate", 1e-5))
    lightning = to_container(cfg.get("lightning")) or {}
    if args.deepspeed_stock:
        import vwm.training.strategy as strategy_module

        strategy_module.speed_up_zero_optimizer = lambda optimizer: False
    strategy = build_strategy(args.strategy, lightning)
    if args.deepspeed_stock and hasattr(strategy, "config") and args.precision.startswith("bf16"):
        strategy.config["bf16"] = {"enabled": True, "check_grad_overflow": True}  # DeepSpeed's default
    if hasattr(strategy, "config"):
        strategy.config["train_micro_batch_size_per_gpu"] = args.batch
    timer = StepTimer(args.warmup - 1 if args.profile else None, args.profile)  # the last warm-up step
    regions = RegionTimer(args.warmup)
    benchmark = bool((lightning.get("trainer") or {}).get("benchmark", False)) if args.benchmark == "config" else (
        args.benchmark == "on")
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, strategy=strategy, precision=args.precision,
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, regions] + ([HostProfile(args.warmup, args.host_profile)] if args.host_profile else []),
        gradient_clip_val=0.3, benchmark=benchmark,
    )
    data = DataLoader(SyntheticClips(frames, args.height, args.width, args.latents, 10_000), batch_size=args.batch,
                      num_workers=4, pin_memory=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=data)
    times = timer.times[args.warmup:]
    vae_s = (time_vae_encode(model, frames, args.height, args.width)
             if torch.cuda.is_available() and not args.latents else None)
    median = statistics.median(times)
    step_tflop = 3 * fwd * args.batch / 1e12
    print(json.dumps({
        "config": os.path.relpath(args.config), "resolution": f"{frames}x{args.height}x{args.width}",
        "batch": args.batch, "latents": args.latents, "strategy": args.strategy, "precision": args.precision,
        "checkpointing": network["params"].get("use_checkpoint"),
        "stored_layers": None if plan is None else f"{len(plan.stored)}/{plan.layers}",
        "recompute_share": None if plan is None else round(plan.recompute_flops / plan.forward_flops, 3),
        "step_s_median": round(median, 4), "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4),
        "clips_per_s": round(args.batch / median, 3), "unet_fwd_tflop_per_clip": round(fwd / 1e12, 2),
        "model_tflop_per_step": round(step_tflop, 1), "mfu": round(step_tflop / median / args.peak_tflops, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "vae_encode_s": None if vae_s is None else round(vae_s, 4),
        "compile": bool(cfg.model.params.get("compile_model", False)),
        "zero_init": args.zero_init,
        "compile_check": model.compiled_check,  # compiled layers: their gradients against eager ones
        "deepspeed_step": "stock" if args.deepspeed_stock else "vwm",
        "bf16_check_grad_overflow": ((getattr(strategy, "config", None) or {}).get("bf16") or {}).get(
            "check_grad_overflow"),
        "adam_form": adam_form(trainer),
        "regions_ms": regions.summary(),  # median GPU-timeline milliseconds per region of a timed step
        "warmup_steps_s": [round(t, 1) for t in timer.times[:args.warmup]],  # the first includes compilation
        "steps_timed": len(times), "steps_total": len(timer.losses),
        "losses_finite": all(math.isfinite(v) for v in timer.losses),
        "loss_first_last": [round(timer.losses[0], 4), round(timer.losses[-1], 4)], "cudnn_benchmark": benchmark, "temporal_conv": "3d" if args.conv3d else "2d",
    }), flush=True)


if __name__ == "__main__":
    main()
