"""Which compiled UNet layer computes wrong gradients: each distinct layer of a config's UNet, compiled alone,
against the same layer in eager mode on the inputs it sees in a real forward; one JSON line per check.

A compiled 576x1024 loss forward + backward on an H100 (2026-12-07, torch 2.11) gave the eager loss but gradients
1.9e4 times their norm away from the eager ones. This finds the layer, then bisects the compiler for it:

1. One forward of the full UNet (random weights, the zero-initialised ones randomised, bf16 on CUDA) records the
   inputs (x, emb, context, frame count) of every res block and transformer.
2. For each distinct layer signature (class, input shapes), the layer's `video_forward` runs eager and compiled
   (`torch.compile`, Inductor) on those inputs with one random output gradient: the output's and the gradients'
   (input, embedding, context, weights) relative distances from eager.
3. For the first `--bisect` layers whose gradients are off by more than `--tolerance`: the same with Inductor's
   mix-order reduction switched the other way (vwm turns it off: `video_unet.INDUCTOR_OPTIONS`), with the
   `aot_eager` backend (AOTAutograd's traced graphs run by eager kernels: off too means the graph capture, not
   the generated kernels), `aot_eager_decomp_partition` (Inductor's decompositions and partitioner, eager
   kernels), Inductor in fp32, and Inductor with the flash attention backend instead of the default (cuDNN on
   Hopper) where the layer attends.

    python bench/compiled_grads.py --config configs/training/vista_phase1.yaml --height 576 --width 1024
    python bench/compiled_grads.py --config configs/tiny/train.yaml --height 64 --width 64 --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import vwm  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from sample import randomize_zero_weights  # noqa: E402
from train_step import SyntheticClips, parse_inductor_options  # noqa: E402
from vwm.config import build_model, load_config  # noqa: E402
from vwm.models.video_unet import INDUCTOR_OPTIONS, VideoLayer  # noqa: E402


def rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """||a - b|| / ||b|| in fp32 (None when either is missing, inf when the reference is zero and a is not)."""
    if a is None or b is None:
        return None
    d, n = torch.linalg.vector_norm((a - b).float()).item(), torch.linalg.vector_norm(b.float()).item()
    return round(d / n, 6) if n > 0 else (0.0 if d == 0 else float("inf"))


def record_inputs(unet: torch.nn.Module, run_forward) -> list[tuple[str, torch.nn.Module, tuple]]:  # noqa: ANN001
    """(name, layer, (x, emb, context, num_frames)) of every video layer, in forward order, from one forward."""
    names = {m: n for n, m in unet.named_modules()}
    seen: list[tuple[str, torch.nn.Module, tuple]] = []
    original = VideoLayer.run

    def spy(self, x, emb, context, num_frames):  # noqa: ANN001
        seen.append((names[self], self, (x.detach().clone(), emb.detach().clone(), context.detach().clone(),
                                         num_frames)))
        return original(self, x, emb, context, num_frames)

    VideoLayer.run = spy
    try:
        with torch.no_grad():
            run_forward()
    finally:
        VideoLayer.run = original
    return seen


def signature(layer: torch.nn.Module, inputs: tuple) -> str:
    x, emb, context, frames = inputs
    return f"{type(layer).__name__}{tuple(x.shape)}c{tuple(context.shape)}t{frames}"


def gradients(layer: torch.nn.Module, fn, inputs: tuple, grad_out: torch.Tensor | None, dtype: torch.dtype):  # noqa: ANN001
    """Output and gradients (of x, emb, context and every weight) of `fn(x, emb, context, frames)` for a random
    output gradient (drawn from a fixed seed when `grad_out` is None)."""
    # fresh leaves each call: the recorded tensors must not collect gradients (or requires_grad) across checks
    x, emb, context, frames = (t.detach().to(dtype).clone().requires_grad_() if torch.is_tensor(t) else t
                               for t in inputs)
    for p in layer.parameters():
        p.grad = None
    out = fn(x, emb, context, frames)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device, out.dtype)
    out.backward(grad_out.to(out.dtype))
    grads = {"x": x.grad, "emb": emb.grad, "context": context.grad}
    grads.update({n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None})
    return out.detach(), grads, grad_out


def layer_functions(layer: torch.nn.Module, mode: str, backend: str, options: dict | None = None):  # noqa: ANN201
    """(eager, compiled) callables of the layer for a mode: `plain` (its math), `ckpt_eager` (checkpointed around
    the compiled math, `compile_layers(checkpoint_in_graph=False)`), `ckpt_graph` (the checkpoint traced into the
    compiled graph, the default `compile_layers()`)."""
    extra = {"options": options} if backend == "inductor" and options else {}
    compile_ = functools.partial(torch.compile, backend=backend, dynamic=False, **extra)
    if mode == "plain":
        return layer.video_forward, compile_(layer.video_forward)
    layer.use_checkpoint = True
    if mode == "ckpt_eager":
        return layer._run, functools.partial(layer._run, forward=compile_(layer.video_forward))
    return layer._run, compile_(layer._run)


def compare(layer: torch.nn.Module, inputs: tuple, backend: str, dtype: torch.dtype, sdpa,  # noqa: ANN001
            mode: str = "plain", options: dict | None = None) -> dict:
    """The compiled layer (mode, backend, dtype, attention backend, Inductor options) against the eager one in the
    same dtype."""
    work = layer if dtype == next(layer.parameters()).dtype else copy.deepcopy(layer).to(dtype)
    ctx = sdpa_kernel(sdpa) if sdpa is not None else contextlib.nullcontext()
    try:
        with ctx:
            torch._dynamo.reset()
            eager, compiled = layer_functions(work, mode, backend, options)
            ref_out, ref, grad_out = gradients(work, eager, inputs, None, dtype)
            t0 = time.perf_counter()
            out, got, _ = gradients(work, compiled, inputs, grad_out, dtype)
            seconds = time.perf_counter() - t0
    finally:
        work.use_checkpoint = False
    weights = {n: rel(got.get(n), g) for n, g in ref.items() if n not in ("x", "emb", "context")}
    worst = max(weights.items(), key=lambda kv: -1 if kv[1] is None else kv[1], default=(None, None))
    all_w = [(got[n] - g).float().norm() ** 2 for n, g in ref.items() if n in got and n not in ("x", "emb", "context")]
    ref_w = [g.float().norm() ** 2 for n, g in ref.items() if n not in ("x", "emb", "context")]
    nonfinite = sorted(n for n, g in got.items() if g is not None and not torch.isfinite(g).all())
    return {"out": rel(out, ref_out), "grad_x": rel(got["x"], ref["x"]), "grad_emb": rel(got["emb"], ref["emb"]),
            "grad_context": rel(got["context"], ref["context"]),
            "grad_weights": round(float(sum(all_w) ** 0.5 / max(float(sum(ref_w) ** 0.5), 1e-30)), 6) if ref_w else None,
            "worst_weight": worst[0], "worst_weight_rel": worst[1], "nonfinite": nonfinite[:6],
            "grad_x_norm": round(float(ref["x"].float().norm()), 4) if ref["x"] is not None else None,
            "compiled_grad_x_norm": round(float(got["x"].float().norm()), 4) if got["x"] is not None else None,
            "first_call_s": round(seconds, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tolerance", type=float, default=0.1, help="relative gradient distance that counts as wrong")
    p.add_argument("--bisect", type=int, default=2, help="wrong layers to bisect the compiler on")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new checks after this many seconds")
    p.add_argument("--modes", nargs="+", default=["plain", "ckpt_eager", "ckpt_graph"],
                   choices=["plain", "ckpt_eager", "ckpt_graph"],
                   help="what is compiled (see layer_functions); the first mode's wrong layers are bisected")
    p.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an Inductor option over vwm's (video_unet.INDUCTOR_OPTIONS) for the checks, e.g. "
                        "triton.mix_order_reduction=True (the torch default); repeatable")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the checks: each selected layer with each of SWEEP's Inductor options over "
                        "vwm's, which of them give the eager gradients")
    p.add_argument("--only", nargs="*", default=[], help="check only layers whose signature contains one of these")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    start = time.perf_counter()

    device = torch.device(args.device)
    cfg = load_config(args.config, list(args.overrides) + ["model.params.compile_model=False",
                                                           "model.params.network_config.params.use_checkpoint=False"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device=device)
    randomize_zero_weights(model.unet)
    model.to(dtype)
    unet = model.unet
    frames = int(cfg.model.params.num_frames)
    clip = SyntheticClips(frames, args.height, args.width, latents=False, length=1)[0]
    batch = {k: v[None].to(device) for k, v in clip.items()}
    with torch.no_grad():
        cond, _ = model.get_conditioning(batch)  # the real conditioner's context, vector and concat
    z = torch.randn(1, frames, 4, args.height // 8, args.width // 8, device=device,
                    generator=torch.Generator(device=device).manual_seed(0), dtype=dtype)
    sigma, mask = torch.full((1,), 5.0, device=device), torch.zeros(1, frames, device=device)
    records = record_inputs(unet, lambda: model.denoiser(model.model, z, sigma, cond, mask))
    args.options = {**INDUCTOR_OPTIONS, **parse_inductor_options(args.inductor_option)}
    common = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "clip": f"{frames}x{args.height}x{args.width}", "torch": torch.__version__,
              "inductor_options": args.options}

    def emit(**fields) -> None:
        print(json.dumps({**fields, **common}), flush=True)

    distinct: dict[str, tuple[str, torch.nn.Module, tuple]] = {}
    for name, layer, inputs in records:
        sig = signature(layer, inputs)
        if sig not in distinct and (not args.only or any(s in sig for s in args.only)):
            distinct[sig] = (name, layer, inputs)
    emit(check="plan", layers=len(records), distinct=len(distinct))
    if args.sweep:
        sweep(distinct, dtype, args, start, emit)
        return
    wrong = []
    for mode in args.modes:
        for sig, (name, layer, inputs) in distinct.items():
            if time.perf_counter() - start > args.budget_s:
                emit(check="stopped", reason="budget", at=f"{mode} {sig}")
                return
            try:
                result = compare(layer, inputs, "inductor", dtype, None, mode, args.options)
            except Exception as err:  # noqa: BLE001  (a failing layer is a result)
                result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            emit(check="inductor", mode=mode, layer=name, signature=sig, **result)
            bad = "error" in result or result["nonfinite"] or any(
                (result.get(k) or 0) > args.tolerance for k in ("out", "grad_x", "grad_emb", "grad_weights"))
            if bad and mode == args.modes[0]:
                wrong.append((sig, name, layer, inputs))
            if "error" in result and "illegal" in result["error"]:
                return  # the CUDA context is unusable after an illegal access
        emit(check="summary", mode=mode, wrong=[s for s, *_ in wrong])
        if mode == args.modes[0]:
            bisect(wrong[: args.bisect], dtype, device, args, start, emit)


SWEEP: list[dict] = [  # Inductor options over vwm's INDUCTOR_OPTIONS (padding and mix-order reduction off)
    {},  # vwm's own
    {"comprehensive_padding": True},  # which of the two paddings breaks the backward (both on: NaN on an H100)
    {"shape_padding": True},
    {"triton.mix_order_reduction": True},  # whether mix-order reduction can come back (padding off)
    {"comprehensive_padding": True, "shape_padding": True, "triton.mix_order_reduction": True},  # torch's defaults
]
"""The 2026-12-07 sweep (bench/results/2026-12-07b-h100/compile_sweep.jsonl) tried eleven sets over torch's
defaults: layout optimisation, split and persistent reductions, precision-cast emulation, the pattern matcher, loop
reordering and no fusion at all each left NaN gradients; only padding off gave the eager ones."""


def sweep(distinct: dict, dtype: torch.dtype, args: argparse.Namespace, start: float, emit) -> None:  # noqa: ANN001
    """Each selected layer compiled with each SWEEP variant (the first mode) against eager; `ok` where the
    gradients and output are finite and within `--tolerance`."""
    for sig, (name, layer, inputs) in distinct.items():
        for variant in SWEEP:
            if time.perf_counter() - start > args.budget_s:
                emit(check="stopped", reason="budget", at=f"sweep {sig} {variant}")
                return
            options = {**args.options, **variant}
            try:
                result = compare(layer, inputs, "inductor", dtype, None, args.modes[0], options)
            except Exception as err:  # noqa: BLE001
                result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            ok = "error" not in result and not result["nonfinite"] and all(
                (result.get(k) or 0) <= args.tolerance for k in ("out", "grad_x", "grad_emb", "grad_weights"))
            emit(check="sweep", mode=args.modes[0], layer=name, signature=sig, variant=variant, ok=ok, **result)
            if "error" in result and "illegal" in result["error"]:
                return


def bisect(wrong: list, dtype: torch.dtype, device: torch.device, args: argparse.Namespace, start: float,
           emit) -> None:  # noqa: ANN001
    """The compiler bisected on each wrong layer (the first mode's): mix-order reduction switched the other way,
    traced graphs run eagerly, Inductor's decompositions and partitioner run eagerly, Inductor in fp32, Inductor
    with flash attention."""
    flipped = {**args.options, "triton.mix_order_reduction": not args.options.get("triton.mix_order_reduction", True)}
    for sig, name, layer, inputs in wrong[: args.bisect]:
        variants = [("inductor", dtype, None, flipped), ("aot_eager", dtype, None, None),
                    ("aot_eager_decomp_partition", dtype, None, None), ("inductor", torch.float32, None, args.options)]
        if device.type == "cuda" and "Transformer" in type(layer).__name__:  # the layers that attend
            variants.append(("inductor", dtype, SDPBackend.FLASH_ATTENTION, args.options))
        for backend, vdtype, sdpa, options in variants:
            if time.perf_counter() - start > args.budget_s:
                emit(check="stopped", reason="budget", at=f"{sig} {backend}")
                return
            try:
                result = compare(layer, inputs, backend, vdtype, sdpa, args.modes[0], options)
            except Exception as err:  # noqa: BLE001
                result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            emit(check="bisect", mode=args.modes[0], layer=name, signature=sig, backend=backend,
                 dtype=str(vdtype).split(".")[-1], sdpa=sdpa.name if sdpa is not None else "default",
                 variant_options=options, **result)
            if "error" in result and "illegal" in result["error"]:
                return


if __name__ == "__main__":
    main()
