#!/usr/bin/env bash
# Multi-GPU checks of train.py on one host with >= 2 GPUs (tiny config, synthetic data):
#   1. DeepSpeed ZeRO-2 over 2 ranks (one process per GPU): 6 steps straight, and 3 steps + `--resume auto` to 6;
#   2. a 2-node launch simulated on the host: two torchrun processes with --nnodes 2, one GPU each, 3 steps, then
#      both resumed to 5.
# Prints one JSON line per run (losses per step, checkpoint manifest) and the comparison of the resumed run.
#   bash bench/multi_gpu.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
CONFIG=configs/tiny/train.yaml
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

train() { "$PY" train.py --base "$CONFIG" --logdir "$WORK" "$@"; }

report() {  # run name -> JSON line: losses and the last manifest
  "$PY" - "$WORK/$1" "$1" <<'EOF'
import glob, json, os, sys
run, name = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
steps = sorted(glob.glob(os.path.join(run, "checkpoints", "step-*", "MANIFEST.json")))
manifest = json.load(open(steps[-1])) if steps else None
print(json.dumps({"run": name, "losses": [[r["step"], r["loss"]] for r in rows],
                  "manifest": {k: manifest.get(k) for k in ("step", "world_size", "format")} if manifest else None}))
EOF
}

compare() {  # two run names -> are the losses and final weights equal?
  "$PY" - "$WORK/$1" "$WORK/$2" "$3" <<'EOF'
import json, os, sys, torch
sys.path.insert(0, os.getcwd())
from vwm.checkpoint import read_state_dict
a, b, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
la = [json.loads(l)["loss"] for l in open(os.path.join(a, "metrics.jsonl"))]
lb = [json.loads(l)["loss"] for l in open(os.path.join(b, "metrics.jsonl"))]
def final(run):
    path = os.path.join(run, "checkpoints", f"step-{step:09d}")
    return read_state_dict(os.path.join(path, "checkpoint") if os.path.isdir(os.path.join(path, "checkpoint"))
                           else os.path.join(path, "lightning.ckpt"))[0]
sa, sb = final(a), final(b)
diff = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
print(json.dumps({"compare": [os.path.basename(a), os.path.basename(b)], "losses_equal": la == lb,
                  "max_loss_diff": max(abs(x - y) for x, y in zip(la, lb)), "max_weight_diff": diff,
                  "same_keys": sa.keys() == sb.keys()}))
EOF
}

Z2=lightning.trainer.strategy=deepspeed_stage_2
train --name z2_full --n_devices 2 --max_steps 6 "$Z2"
train --name z2_cut --n_devices 2 --max_steps 3 "$Z2"
train --name z2_cut --n_devices 2 --max_steps 6 --resume auto "$Z2"
report z2_full; report z2_cut; compare z2_full z2_cut 6

nodes() {  # max_steps, extra args
  local steps=$1; shift
  local port=$((29500 + RANDOM % 1000)) pids=()
  for node in 0 1; do
    CUDA_VISIBLE_DEVICES=$node "$PY" -m torch.distributed.run --nnodes 2 --nproc_per_node 1 --node_rank $node \
      --master_addr 127.0.0.1 --master_port $port train.py --base "$CONFIG" --logdir "$WORK" --name nodes \
      --num_nodes 2 --n_devices 1 --max_steps "$steps" "$Z2" "$@" > "$WORK/nodes_$node.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
nodes 3
nodes 5 --resume auto
report nodes
