"""The GEGLU feed-forward projection of the SVD UNet at a sampling step's shapes: the plain path (a matrix product,
then `a * gelu(g)`), eager and compiled as the sampler compiles it, against the fused kernel of
`vwm.models.fused_geglu`. One JSON line per shape (time of each path, the fused kernel's error next to the plain
path's, both against an fp32 computation from the same bf16 inputs), then a total over one UNet forward.

    python bench/geglu.py                     # 25x576x1024, batch 2 (one CFG step)
    python bench/geglu.py --height 320 --width 576 --batch 1
    python bench/geglu.py --sweep             # and every tile config of the kernel's autotuning list
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from vwm.models import fused_geglu  # noqa: E402

# SVD-XT UNet: model channels 320, multipliers (1, 2, 4, 4), transformers at the first three levels; every level has
# 2 input and 3 output transformer layers, each a spatial and a temporal block with one GEGLU; the middle block has
# one layer (two GEGLUs) at the fourth level's resolution.
LEVELS = [(1, 320, 10), (2, 640, 10), (4, 1280, 10), (8, 1280, 2)]


def shapes(height: int, width: int, frames: int, batch: int) -> list[dict]:
    h, w = height // 8, width // 8
    rows = []
    for down, channels, count in LEVELS:
        tokens = -(-h // down) * -(-w // down)
        rows.append({"m": batch * frames * tokens, "k": channels, "n": 4 * channels, "per_forward": count})
    return rows


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true",
                        help="also time every tile config of the kernel's autotuning list at each shape (each shape's "
                             "line gets sweep_ms: milliseconds per config), to tune the list")
    args = parser.parse_args()
    if not fused_geglu.available():
        raise SystemExit("bench/geglu.py needs a CUDA GPU with Triton")
    device = torch.device("cuda")
    compiled = torch.compile(fused_geglu.geglu_reference, dynamic=False)
    total = {"eager_ms": 0.0, "compiled_ms": 0.0, "fused_ms": 0.0}
    torch.manual_seed(0)
    for row in shapes(args.height, args.width, args.frames, args.batch):
        m, k, n = row["m"], row["k"], row["n"]
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        weight = (torch.randn(2 * n, k, device=device) / k ** 0.5).to(torch.bfloat16)
        bias = (torch.randn(2 * n, device=device) * 0.1).to(torch.bfloat16)
        with torch.no_grad():
            exact = fused_geglu.geglu_reference(x.float(), weight.float(), bias.float())
            outs = {"eager": lambda: fused_geglu.geglu_reference(x, weight, bias),
                    "compiled": lambda: compiled(x, weight, bias),
                    "fused": lambda: fused_geglu.geglu(x, weight, bias)}
            scale = exact.abs().max().item()
            line = {"bench": "geglu", **row}
            for name, fn in outs.items():
                y = fn()  # warm-up: compilation and autotuning
                torch.cuda.synchronize()
                line[f"{name}_max_err"] = round((y.float() - exact).abs().max().item() / scale, 6)
                line[f"{name}_ms"] = round(timed(fn, args.reps), 4)
                total[f"{name}_ms"] += line[f"{name}_ms"] * row["per_forward"]
            if args.sweep:
                sweep = {}
                for config in fused_geglu._configs():
                    name = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**config.kwargs)
                    name += f"_w{config.num_warps}_s{config.num_stages}"
                    try:
                        fused_geglu.run_config(x, weight, bias, config)
                        sweep[name] = round(timed(lambda c=config: fused_geglu.run_config(x, weight, bias, c),
                                                  args.reps), 4)
                    except Exception as err:  # noqa: BLE001 - a config that does not fit (shared memory) is data
                        sweep[name] = f"failed: {type(err).__name__}"
                line["sweep_ms"] = sweep
            del exact
        print(json.dumps(line), flush=True)
    print(json.dumps({"bench": "geglu_per_forward", **{k: round(v, 2) for k, v in total.items()},
                      "saved_ms": round(total["compiled_ms"] - total["fused_ms"], 2),
                      "clip": f"{args.frames}x{args.height}x{args.width}", "batch": args.batch,
                      "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
