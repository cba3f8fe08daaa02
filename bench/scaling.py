"""Data-parallel scaling of the real training path: `train.py` under torchrun on 1, 2, 4, 8 GPUs of one host
(DeepSpeed ZeRO-2 as the config says, random clips from vwm.data.synthetic, random weights: --from-scratch); one JSON line per
process count with clips/s, step time, peak memory and the scaling efficiency clips/s(N) / (N x clips/s(1)).

    python bench/scaling.py --config configs/training/vista_phase1.yaml --height 576 --width 1024 --gpus 1 2 4 8
    python bench/scaling.py --config configs/training/vista_phase2_stage1.yaml --height 320 --width 576 --gpus 1 8
    python bench/scaling.py --config configs/tiny/train.yaml --height 64 --width 64 --gpus 1 2 --cpu   # smoke test

Throughput is train.py's own ThroughputMonitor (every 10 optimizer steps, rank 0, synchronised): the last
window of a run of --steps steps, so compilation and warm-up stay out of it. Extra `a.b=c` arguments go to
train.py as config overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 10
"""Optimizer steps per throughput measurement of train.py's ThroughputMonitor."""


def run_one(n: int, args: argparse.Namespace, work: str) -> dict:
    """Train `args.steps` steps on `n` processes and return the last throughput window's numbers."""
    name = f"scale-n{n}"
    overrides = [
        "data.params.subsets=[{target: vwm.data.synthetic.RandomClips, params: {length: 100000}}]",
        "data.params.probs=[1]", f"data.params.target_height={args.height}", f"data.params.target_width={args.width}",
        f"data.params.batch_size={args.batch}", f"data.params.num_workers={args.workers}",
        "lightning.checkpoint.every_n_steps=1000000", "lightning.callbacks=null", *args.overrides,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(REPO, "train.py"), "--base", args.config, "--logdir", work, "--name", name,
           "--max_steps", str(args.steps), "--from-scratch", *args.train_args, *overrides]
    if args.cpu:
        cmd += ["--accelerator", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    if not args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        return {"gpus": n, "error": f"train.py exited {out.returncode}", "stderr_tail": out.stderr[-1500:]}
    rows = [json.loads(line) for line in open(os.path.join(work, name, "metrics.jsonl"))]
    perf = [r for r in rows if "perf/clips_per_s" in r]
    last = perf[-1]
    # callback_metrics keep the last value, so rows repeat a window's numbers until the next one: take the
    # value logged at the window's end (the final step).
    return {"gpus": n, "clips_per_s": round(last["perf/clips_per_s"], 3), "step_s": round(last["perf/step_s"], 4),
            "peak_gib": round(last["perf/peak_mem_gib"], 2) if "perf/peak_mem_gib" in last else None,
            "mfu": round(last["perf/mfu"], 4), "steps": rows[-1]["step"], "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=1, help="clips per GPU per micro-batch")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    p.add_argument("--steps", type=int, default=3 * WINDOW + 1,
                   help=f"optimizer steps per run; throughput is the last window of {WINDOW}")
    p.add_argument("--work", default=None, help="run directories (default: a temporary folder)")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU processes (smoke test with a tiny config)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="further train.py flags (last on the line)")
    p.add_argument("overrides", nargs="*", help="a.b=c config overrides")
    args = p.parse_args()
    if args.steps < 2 * WINDOW + 1:
        p.error(f"--steps={args.steps} must be >= {2 * WINDOW + 1}: the first throughput window includes warm-up")
    work = args.work or tempfile.mkdtemp(prefix="vwm-scaling-")
    base = None
    for n in args.gpus:
        line = run_one(n, args, work)
        if "error" not in line:
            base = base or (line["clips_per_s"] / line["gpus"] if n == args.gpus[0] else None)
            if base:
                line["efficiency"] = round(line["clips_per_s"] / (n * base), 3)
        line.update(config=os.path.relpath(args.config, REPO), clip=f"{args.height}x{args.width}", batch=args.batch)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
