"""Where a training step and a sampling step spend their time, region by region, on one GPU; one JSON line each.

Builds the full-size model of a config (random weights, bf16 like DeepSpeed's bf16 mode, EMA in fp32) without
Lightning or DeepSpeed and times, with CUDA events (median of --reps after a warm-up):

- `conditioner`: the embedders of one batch (CLIP image encoder, VAE encode of the condition frame, actions);
- `vae_encode`: the first-stage encode of the clip, in each `--vae-variants` (layout, chunking, compilation, the
  GroupNorm kernels: a variant naming `fusedgn` switches them on, vwm.models.fused_groupnorm);
- `unet_fwd`: one UNet forward without gradients at the sampling batch (2 = batched CFG), per attention
  backend in `--sdpa`, with a kernel-category profile of one forward;
- `loss_fwd_bwd`: the Vista loss forward + backward of one clip (activation checkpointing as configured, or per
  `--checkpointing`), per attention backend in `--sdpa`, with its peak memory, the gradients' finiteness and
  (`--compare-eager`) their distance from the eager layers' gradients;
- `optimizer`, `ema`: a fused AdamW step over fp32 master copies of the trainable weights plus the copy back to
  the bf16 weights (what ZeRO-2 does on one GPU), and the EMA update.

    python bench/regions.py --config configs/training/vista_phase1.yaml --height 576 --width 1024
    python bench/regions.py --config configs/tiny/train.yaml --height 64 --width 64 --device cpu --reps 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import vwm  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from sample import randomize_zero_weights  # noqa: E402
from train_step import KERNEL_CATEGORIES, SyntheticClips, parse_inductor_options  # noqa: E402
from vwm.models.layers import use_fused_groupnorm  # noqa: E402
from vwm.models.vae_networks import AttnBlock  # noqa: E402
from vwm.config import build_model, load_config, to_container  # noqa: E402
from vwm.models.video_unet import INDUCTOR_OPTIONS  # noqa: E402
from vwm.training.activation_plan import apply_activation_plan  # noqa: E402
from vwm.training.flops import GIB, unet_forward_flops  # noqa: E402

# `flash` also allows the memory-efficient kernel, for the VAE's single 512-wide head, which flash attention does
# not support (the loss region encodes the condition frame); every UNet head is 64 wide, which flash takes.
BACKENDS = {"default": None, "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
            "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> dict:
    """Median/min seconds of `fn` over `reps` runs after `warmup` runs; peak memory over the timed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    out = {"s_median": round(statistics.median(times), 4), "s_min": round(min(times), 4)}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
    return out


def kernel_categories(fn: Callable[[], object], device: torch.device, top: int = 0) -> dict:
    """GPU kernel milliseconds of one call of `fn` by category (bench/train_step.py's categories), and the `top`
    costliest kernels by name."""
    if device.type != "cuda":
        return {}
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        _sync(device)
    cats: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.device_time / 1e3
        name = evt.name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
        kernels[evt.name[:90]] = kernels.get(evt.name[:90], 0.0) + ms
    total = sum(cats.values())
    out = {"kernel_ms": round(total, 1), **{k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}}
    if top:
        out["top"] = [[n, round(v, 1)] for n, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]]
    return out


def grad_distance(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """How far one set of gradients is from another: the relative distance of all of them together, the worst
    tensor's relative distance (and its name), and the tensors missing from either side."""
    diff = ref = 0.0
    worst, worst_name = 0.0, None
    for name, r in reference.items():
        g = grads.get(name)
        if g is None:
            continue
        d, n = torch.linalg.vector_norm((g - r).float()).item(), torch.linalg.vector_norm(r.float()).item()
        diff, ref = diff + d * d, ref + n * n
        if n > 0 and d / n > worst:
            worst, worst_name = d / n, name
    return {"grad_rel_distance": round((diff / ref) ** 0.5, 5) if ref else None, "worst_tensor_rel_distance":
            round(worst, 5), "worst_tensor": worst_name, "missing": sorted(set(reference) ^ set(grads))[:8]}


def _attention_by_matmul(self, x: torch.Tensor) -> torch.Tensor:
    """The VAE's single-head mid-block attention as two batched matmuls and a softmax (A/B variant `bmm`)."""
    h = self.norm(x)
    n, c, height, width = h.shape
    q, k, v = (proj(h).flatten(2) for proj in (self.q, self.k, self.v))
    weights = torch.bmm(q.transpose(1, 2), k).mul_(c ** -0.5).softmax(dim=-1)
    return x + self.proj_out(torch.bmm(v, weights.transpose(1, 2)).view(n, c, height, width))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--regions", nargs="+", default=["conditioner", "vae", "unet_fwd", "loss", "optimizer"])
    p.add_argument("--vae-variants", nargs="+", default=["nchw", "channels_last", "channels_last_compiled"])
    p.add_argument("--sdpa", nargs="+", default=["default"], choices=sorted(BACKENDS),
                   help="attention backends to run the unet_fwd and loss regions with, one line each")
    p.add_argument("--unet-batch", type=int, default=2, help="UNet forward batch (2 = batched CFG sampling)")
    p.add_argument("--checkpointing", choices=["config", "on", "off", "auto"], default="config",
                   help="auto: the trainer's activation plan for this GPU's memory (use_checkpoint: auto)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the UNet layers")
    p.add_argument("--checkpoint-in", choices=["graph", "eager"], default="graph",
                   help="compiled layers: checkpoint inside the compiled graph, or in eager code around it")
    p.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="compiled layers: an Inductor option over vwm's (video_unet.INDUCTOR_OPTIONS), e.g. "
                        "triton.mix_order_reduction=True; repeatable")
    p.add_argument("--compare-eager", action="store_true",
                   help="loss region: also run the eager layers once and report the compiled gradients' distance")
    p.add_argument("--top", type=int, default=12, help="costliest kernels listed per profiled region")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    device = torch.device(args.device)
    overrides = list(args.overrides) + ["model.params.compile_model=False"]
    if args.checkpointing != "config":
        value = "auto" if args.checkpointing == "auto" else args.checkpointing == "on"
        overrides.append(f"model.params.network_config.params.use_checkpoint={value}")
    cfg = load_config(args.config, overrides)
    frames = int(cfg.model.params.num_frames)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device=device)
    # the zero-initialised output layers would make every gradient but the last layer's exactly zero, so the
    # gradient checks of the loss region would check nothing
    randomize_zero_weights(model.unet)
    model.to(dtype)  # EMA shadows stay fp32 (LitEma._apply)
    plan = apply_activation_plan(model, cfg, world_size=1, precision="bf16-mixed", device=device)
    common = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "clip": f"{frames}x{args.height}x{args.width}", "torch": torch.__version__}
    if args.compile:
        extra = parse_inductor_options(args.inductor_option)
        model.unet.compile_layers(checkpoint_in_graph=args.checkpoint_in == "graph", inductor_options=extra)
        common["inductor_options"] = {**INDUCTOR_OPTIONS, **extra}
    fwd_flop = unet_forward_flops(to_container(cfg.model.params.network_config), frames, args.height, args.width)

    def emit(region: str, **fields) -> None:
        print(json.dumps({"region": region, **fields, **common}), flush=True)

    clip = SyntheticClips(frames, args.height, args.width, latents=False, length=1)[0]
    batch = {k: v[None].to(device) for k, v in clip.items()}
    gen = torch.Generator(device=device)

    if "conditioner" in args.regions:
        with torch.no_grad():
            emit("conditioner", **timed(lambda: model.conditioner(batch, generator=gen.manual_seed(0)), device,
                                         args.reps))

    if "vae" in args.regions:
        x = batch["img_seq"].to(dtype)
        vae = model.first_stage_model
        for variant in args.vae_variants:
            fmt = torch.channels_last if "channels_last" in variant else torch.contiguous_format
            encoder = vae.encoder.to(memory_format=fmt)
            use_fused_groupnorm(encoder, "fusedgn" in variant)
            if "compiled" in variant:
                torch._dynamo.reset()  # a fresh graph per variant (layout and attention differ between them)
                vae.encoder = torch.compile(encoder, dynamic=False)
            chunk = frames if "whole" in variant else model._first_stage_chunk(frames)
            attn_forward = AttnBlock.forward
            if "bmm" in variant:
                AttnBlock.forward = _attention_by_matmul
            with torch.no_grad():
                t0 = time.perf_counter()
                vae.encode_video(x, chunk, generator=gen.manual_seed(0))
                _sync(device)
                first = time.perf_counter() - t0
                stats = timed(lambda: vae.encode_video(x, chunk, generator=gen.manual_seed(0)), device, args.reps)
                cats = kernel_categories(lambda: vae.encode_video(x, chunk, generator=gen.manual_seed(0)), device,
                                         args.top if variant == args.vae_variants[-1] else 0)
            vae.encoder = encoder
            use_fused_groupnorm(encoder, False)
            AttnBlock.forward = attn_forward
            emit("vae_encode", variant=variant, chunk=chunk, first_call_s=round(first, 2), **stats, kernels=cats)
        vae.encoder.to(memory_format=torch.contiguous_format)

    if "unet_fwd" in args.regions:
        with torch.no_grad():
            cond, _ = model.get_conditioning(batch)
            cond = {k: torch.cat([v] * args.unet_batch) for k, v in cond.items()}
            h, w = args.height // 8, args.width // 8
            z = torch.randn(args.unet_batch, frames, 4, h, w, device=device, dtype=dtype)
            sigma = torch.full((args.unet_batch,), 5.0, device=device)
            mask = torch.zeros(args.unet_batch, frames, device=device)

            def fwd():
                return model.denoiser(model.model, z, sigma, cond, mask)

            for name in args.sdpa:
                ctx = sdpa_kernel(BACKENDS[name]) if BACKENDS[name] is not None else contextlib.nullcontext()
                try:
                    with ctx:
                        t0 = time.perf_counter()
                        fwd()
                        _sync(device)
                        first = round(time.perf_counter() - t0, 2)
                        stats = timed(fwd, device, args.reps)
                        cats = kernel_categories(fwd, device, args.top)
                except RuntimeError as err:  # a backend that refuses these shapes
                    emit("unet_fwd", sdpa=name, error=str(err).splitlines()[0][:200])
                    continue
                tflops = args.unet_batch * fwd_flop / stats["s_median"] / 1e12
                emit("unet_fwd", sdpa=name, compiled=args.compile, first_call_s=first, batch=args.unet_batch, tflop=round(args.unet_batch * fwd_flop / 1e12, 1),
                     tflops_per_s=round(tflops, 1), **stats, kernels=cats)

    if "loss" in args.regions:
        model.train()
        model.first_stage_model.eval()
        with torch.no_grad():
            z = model.encode_first_stage(batch["img_seq"].to(dtype), generator=gen.manual_seed(0))

        def loss_step(check: dict | None = None):
            out = model.loss_fn(model.model, model.denoiser, model.conditioner(batch, generator=gen.manual_seed(1)),
                                z, generator=gen.manual_seed(2))
            out.loss.backward()
            if check is not None:  # what the trainer's update check sees: the loss and the gradients' finiteness
                named = [(n, q.grad) for n, q in model.model.named_parameters() if q.grad is not None]
                bad = [n for n, g in named if not torch.isfinite(g).all()]
                check.update(loss=float(out.loss.detach().float()), nonfinite_grads=len(bad), nonfinite_names=bad[:8],
                             grad_norm=float(torch.linalg.vector_norm(
                                 torch.stack([torch.linalg.vector_norm(g.float()) for _, g in named]))))
                if check.get("keep_grads"):
                    check["grads"] = {n: g.detach().clone() for n, g in named}
            for prm in model.model.parameters():
                prm.grad = None

        ckpt = bool(cfg.model.params.network_config.params.get("use_checkpoint", False))
        # forwards per step: 3 (forward + backward), plus the recomputed share of one (all of it when every layer
        # is checkpointed, the plan's share under auto)
        recompute = (plan.recompute_flops / plan.forward_flops if plan.forward_flops else 0.0) if plan else float(ckpt)
        layers = [m for m in model.unet.modules() if getattr(m, "compiled_run", None) is not None]
        reference = None
        if args.compare_eager and layers:
            compiled_runs = [m.compiled_run for m in layers]
            for m in layers:
                m.compiled_run = None
            loss_step(reference := {"keep_grads": True})
            for m, run in zip(layers, compiled_runs):
                m.compiled_run = run
        for name in args.sdpa:
            if layers and name != args.sdpa[0]:
                torch._dynamo.reset()  # the attention backend is chosen when a graph is traced
            ctx = sdpa_kernel(BACKENDS[name]) if BACKENDS[name] is not None else contextlib.nullcontext()
            check: dict = {"keep_grads": reference is not None}
            try:
                with ctx:
                    t0 = time.perf_counter()
                    loss_step(check)
                    _sync(device)
                    first = round(time.perf_counter() - t0, 2)
                    if reference is not None:
                        check.update(grad_distance(check.pop("grads"), reference["grads"]))
                    stats = timed(loss_step, device, args.reps)
                    cats = kernel_categories(loss_step, device, args.top)
            except Exception as err:  # noqa: BLE001  (a failing variant is a result; the next one still runs)
                emit("loss_fwd_bwd", sdpa=name, compiled=args.compile, checkpoint_in=args.checkpoint_in,
                     error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
                if device.type == "cuda" and "illegal" in str(err):
                    return  # the context is unusable after an illegal access
                continue
            check.pop("keep_grads", None)
            if plan is not None:
                check.update(stored_layers=len(plan.stored), recomputed_share=round(recompute, 3))
            if reference is not None:
                check["eager_loss"] = reference["loss"]
            emit("loss_fwd_bwd", sdpa=name, checkpointing=ckpt, **check, compiled=args.compile,
                 checkpoint_in=args.checkpoint_in if args.compile else None, first_call_s=first,
                 unet_fwd_tflop=round(fwd_flop / 1e12, 1),
                 tflops_per_s=round((3 + recompute) * fwd_flop / stats["s_median"] / 1e12, 1), **stats, kernels=cats)

    if "optimizer" in args.regions:
        params = [q for q in model.model.parameters() if q.requires_grad]
        masters = [q.detach().float().clone() for q in params]
        for m in masters:
            m.grad = torch.randn_like(m) * 1e-3
        opt = torch.optim.AdamW(masters, lr=1e-5, fused=device.type == "cuda")

        @torch.no_grad()
        def opt_step():
            opt.step()
            torch._foreach_copy_(params, masters)

        emit("optimizer", n_params=sum(q.numel() for q in params), **timed(opt_step, device, args.reps))
        del opt, masters
        if model.use_ema:
            emit("ema", **timed(lambda: model.model_ema(model.model), device, args.reps))


if __name__ == "__main__":
    main()
