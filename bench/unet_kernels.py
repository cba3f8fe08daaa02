"""Profile one UNet forward + backward on the GPU and attribute kernel time to the PyTorch ops (and shapes) that
launched them; prints JSON lines: the ops with the most kernel time, then a per-category total.

It finds slow paths that a category table hides, such as matrix products that fall back to unaligned
(`align1`) or pre-Hopper (`cutlass_75`) kernels because of an operand's layout.

    python bench/unet_kernels.py --config configs/training/vista_phase1.yaml --height 576 --width 1024
    python bench/unet_kernels.py ... --compile         # the regionally compiled UNet (model.params.compile_model)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vwm  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402

from vwm.config import instantiate, load_config, to_container  # noqa: E402


def build_unet(config: str, overrides: list[str], checkpointing: bool | None) -> torch.nn.Module:
    cfg = load_config(config, overrides)
    network = to_container(cfg.model.params.network_config)
    if checkpointing is not None:
        network["params"]["use_checkpoint"] = checkpointing
    with torch.device("cuda"):
        unet = instantiate(network)
    return unet.to(torch.bfloat16)


def inputs(unet, frames: int, height: int, width: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, frames, unet.in_channels, height // 8, width // 8, device="cuda", generator=g)
    c_noise = torch.randn(1, frames, device="cuda", generator=g)
    from vwm.models.attention import BasicTransformerBlock

    attn2 = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock)).attn2
    ctx_dim = attn2.context_dim
    if attn2.action_control:
        from vwm.actions import ACTION_CONTEXT_DIM

        ctx_dim += ACTION_CONTEXT_DIM
    context = torch.randn(1, 1, ctx_dim, device="cuda", generator=g)
    y = torch.randn(1, unet.label_emb[0][0].in_features, device="cuda", generator=g) if unet.num_classes else None
    return x.bfloat16(), c_noise, context.bfloat16(), None if y is None else y.bfloat16()


def step(unet, args) -> None:
    out = unet(*args)
    out.float().square().mean().backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--checkpointing", choices=["config", "on", "off"], default="config")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    ckpt = None if a.checkpointing == "config" else a.checkpointing == "on"
    unet = build_unet(a.config, a.overrides, ckpt)
    if a.compile:
        unet.compile_layers()
    args = inputs(unet, a.frames, a.height, a.width)
    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step(unet, args)
        unet.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step(unet, args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        unet.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                record_shapes=True) as prof:
        step(unet, args)
        torch.cuda.synchronize()
    ops: dict[tuple, list] = {}
    for evt in prof.events():
        kernels = [k for k in getattr(evt, "kernels", [])]
        if not kernels or not evt.name.startswith("aten::"):
            continue
        names = sorted({k.name for k in kernels})
        ms = sum(k.duration for k in kernels) / 1e3
        key = (evt.name, str(evt.input_shapes)[:160], names[0][:90])
        entry = ops.setdefault(key, [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    total = sum(v[0] for v in ops.values())
    print(json.dumps({"config": a.config, "resolution": f"{a.frames}x{a.height}x{a.width}", "compile": a.compile,
                      "fwd_bwd_s": round(sorted(times)[1], 4), "warmup_s": round(warm, 1),
                      "kernel_ms_attributed": round(total, 1),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
    for (op, shapes, kernel), (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(json.dumps({"ms": round(ms, 2), "calls": n, "op": op, "shapes": shapes, "kernel": kernel}), flush=True)
    slow = {k: v for k, v in ops.items() if "align1" in k[2] or "cutlass_75" in k[2] or "sm80" in k[2]}
    print(json.dumps({"legacy_or_unaligned_kernel_ms": round(sum(v[0] for v in slow.values()), 1),
                      "ops": sorted({(k[0], k[1]) for k in slow}, key=str)[:20]}), flush=True)


if __name__ == "__main__":
    main()
