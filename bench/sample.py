"""Sampling time and peak memory of one clip: 25x576x1024, 50 Euler steps with CFG (VanillaCFG 2.5), in the
normal mode (everything on the GPU, bf16 UNet, batched CFG), the same with the UNet compiled, and the --low_vram
mode (only the module in use on the GPU, small decode windows; compiled, as sample.py runs it on CUDA), with
random weights of the full-size Vista config built on the GPU (the zero-initialised layers randomised too, so that
the UNet's output depends on its weights and the modes' PSNR against each other measures something). The
reference takes 47.7 s and 52.5 GiB on one H100 (DESIGN.md §6).

    python bench/sample.py                  # GPU; one JSON line per mode
    python bench/sample.py --config configs/tiny/model.yaml --height 64 --width 64 --frames 5 --steps 2

A short warm-up rollout (same shapes) runs first in each mode; `seconds` is the timed rollout: conditioning,
VAE encode, denoising, final decode, synchronised. `peak_gib` is torch.cuda.max_memory_allocated over it
(on a CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import vwm  # noqa: E402  (torchvision shim before open_clip / Lightning)
from vwm import rollout as ro  # noqa: E402
from vwm.config import build_model, load_config  # noqa: E402
from vwm.data.batch import action_batch  # noqa: E402
from vwm.sampling.actions import normalise_actions  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import parse_inductor_options  # noqa: E402


def _start_frame(height: int, width: int) -> torch.Tensor:
    """(1, 1, 3, H, W) in [-1, 1]: a smooth road-like gradient with a little texture (deterministic)."""
    g = torch.Generator().manual_seed(0)
    y = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    x = torch.linspace(-1, 1, width)[None, :].expand(height, width)
    image = torch.stack([0.6 * y, 0.4 * x * y, -0.5 * y + 0.2 * x])
    image = image + 0.05 * torch.randn(3, height, width, generator=g)
    return image.clamp(-1, 1)[None, None]


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def randomize_zero_weights(module: torch.nn.Module, seed: int = 0) -> int:
    """Give every all-zero floating-point weight of `module` random values of scale 1/sqrt(fan-in); the number of
    tensors changed. A freshly built SVD UNet zero-initialises its output convolution (and the last layer of
    every block), so its output is exactly zero whatever its other weights: every sampling mode would then
    produce the same video (the denoiser's skip path alone), and a PSNR between modes (FP8 against bf16)
    would measure nothing."""
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point() and param.dim() >= 1 and not param.any():
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                values = torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)
                param.copy_(values.to(param.dtype))
                changed += 1
    return changed


def placement_compiles(mode: str) -> bool:
    """Whether a mode compiles the UNet's layers (low_vram does: `sample.py --low_vram` compiles on CUDA)."""
    return mode in ("compiled", "fused", "fused_gn", "fp8", "low_vram")


def bench_mode(cfg, device: torch.device, mode: str, args: argparse.Namespace,
               reference: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """Build the model on the device, warm up (compiling, in modes `compiled` and `fp8`), time one rollout; the
    result line of this mode (with its PSNR against `reference`, the first mode's video) and the video."""
    low_vram = mode == "low_vram"
    torch.manual_seed(0)  # the same random weights in every mode, so the modes' rollouts compare (PSNR)
    model = build_model(cfg, device=device)
    randomize_zero_weights(model.unet)
    if model.num_frames != args.frames:
        raise ValueError(f"--frames={args.frames} is invalid; allowed: {model.num_frames} (the config's "
                         "num_frames)")
    placement = ro.Placement(model, device, low_vram=low_vram, compile_unet=placement_compiles(mode),
                             fp8=mode == "fp8", unet_dtype=torch.bfloat16 if mode == "fp8" else None,
                             inductor_options=args.options,
                             fused_geglu={"compiled": False, "fused": True}.get(mode),  # others: the default
                             fused_groupnorm={"compiled": False, "fused_gn": True}.get(mode))
    frames = _start_frame(args.height, args.width)
    actions = [action_batch([normalise_actions({"trajectory": [2, 0, 4, 0, 6, 0.1, 8, 0.2]})])]
    settings = ro.RolloutSettings(n_steps=args.warmup_steps, cfg_scale=args.cfg_scale, sampler=args.sampler)
    start = time.perf_counter()
    ro.rollout(model, frames, actions, [ro.sample_generator(0, 1)], settings, placement)
    warmup_s = time.perf_counter() - start
    settings = ro.RolloutSettings(n_steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = ro.rollout(model, frames, actions, [ro.sample_generator(0, 0)], settings, placement)
    seconds = time.perf_counter() - start
    line = {
        "mode": mode, "seconds": round(seconds, 3), "warmup_s": round(warmup_s, 1),
        "peak_gib": round(_peak_gib(device), 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "clip": f"{args.frames}x{args.height}x{args.width}", "steps": args.steps, "sampler": args.sampler,
        "guidance": f"VanillaCFG {args.cfg_scale}",
        "unet_dtype": str(placement.unet_dtype).removeprefix("torch."),
        "decode_chunk": placement.decode_chunk(settings),
        "stages_s": {k: round(v, 3) for k, v in result.timings.items()},
        "finite": bool(torch.isfinite(result.video).all()), "torch": torch.__version__,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "inductor_options": args.options if placement_compiles(mode) else None,
        "fused_geglu": placement.fused_geglu, "fused_groupnorm": placement.fused_groupnorm,
    }
    if args.decode_bf16:  # the same latents decoded again with the VAE decoder in bf16 (Placement(decode_dtype=))
        chunk = placement.decode_chunk(settings) or result.latents.shape[1]
        model.first_stage_model.decoder.to(torch.bfloat16)
        for _ in range(2):  # the first call compiles in the compiled modes; the second is timed
            start = time.perf_counter()
            with placement.use(model.first_stage_model):  # low_vram: on the device only while decoding
                video_bf16 = ro.decode_latents(model, result.latents.to(device), chunk).clamp(-1.0, 1.0).cpu()
            decode_bf16_s = time.perf_counter() - start
        line["decode_bf16_s"] = round(decode_bf16_s, 3)
        line["decode_bf16_psnr_vs_fp32_db"] = round(_psnr(video_bf16, result.video), 2)
    if reference is not None:  # the same rollout (seed, actions) of the first mode: what this mode changes
        line["psnr_vs_first_mode_db"] = round(_psnr(result.video, reference), 2)
    video = result.video.cpu()
    del model, placement, result
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return line, video


def _psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(((video.float().cpu() - reference.float().cpu()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def main() -> None:
    """Run every requested mode and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "inference", "vista.yaml"))
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--cfg_scale", type=float, default=2.5)
    parser.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    parser.add_argument("--modes", nargs="+",
                        choices=["normal", "compiled", "fused", "fused_gn", "fp8", "low_vram"],
                        default=["normal", "compiled", "low_vram"],
                        help="normal: eager, all on the GPU; compiled: normal with the UNet layers compiled "
                             "(warmup_s includes the compilation); fused: compiled with the feed-forward GEGLU as one "
                             "kernel (vwm.models.fused_geglu); fused_gn: compiled with the GroupNorms (+ SiLU) "
                             "as Triton kernels (vwm.models.fused_groupnorm); fp8: compiled with FP8 linear layers "
                             "(sample.py --fp8); low_vram: one module on the GPU at a time, compiled as "
                             "sample.py --low_vram compiles on CUDA. Every mode after "
                             "the first reports its PSNR against the first mode's rollout")
    parser.add_argument("--decode_bf16", action="store_true",
                        help="also decode each mode's latents with the VAE decoder in bf16: its time and PSNR "
                             "against the fp32 decode")
    parser.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                        help="compiled modes: an Inductor option over torch's defaults (sampling compiles with "
                             "them: VideoUNet.compile_layers(inference=True)), e.g. comprehensive_padding=False; "
                             "repeatable")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cudnn_benchmark", choices=["on", "off"], default="off",
                        help="torch.backends.cudnn.benchmark: time the convolution algorithms for the fixed shapes")
    args = parser.parse_args()
    args.options = parse_inductor_options(args.inductor_option)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    device = torch.device(args.device)
    cfg = load_config(args.config)
    reference = None
    for mode in args.modes:
        line, video = bench_mode(cfg, device, mode, args, reference)
        reference = video if reference is None else reference
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
