#!/usr/bin/env bash
# The whole Vista recipe in miniature, through the real CLIs, on CPU (CI runs it: tests/test_phases.py):
#   phase 1 (all UNet weights, DeepSpeed ZeRO-2 on 2 processes) -> bin_to_st.py of its checkpoint dir
#   -> phase 2 stage 1 (LoRA + action control, only adapters train, --finetune the phase-1 export)
#   -> bin_to_st.py --keep-lora (stage 2 continues the same adapters, as the reference does)
#   -> stage 2 at 64x128 (--finetune the stage-1 export) -> bin_to_st.py (EMA folded, LoRA merged)
#   -> sample.py on the toy world from the final export, with no config but the one it embeds.
# Usage: scripts/phases_tiny.sh OUT_DIR
#   OUT_DIR must not hold runs of the same names. Optional environment: PYTHON (the interpreter),
#   STEPS (optimizer steps per phase, default 3).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
PY=${PYTHON:-python}
STEPS=${STEPS:-3}
cd "$(dirname "$0")/.."
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE NODE_RANK GROUP_RANK
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/ckpts"

logged() {  # logged LOGFILE CMD...: run CMD with its output in LOGFILE; on failure show the end of it
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        echo "FAILED: $*" >&2
        tail -n 60 "$log" >&2
        exit 1
    fi
}

train() {  # train NAME CONFIG [ARGS...]
    local name=$1 config=$2
    shift 2
    echo "== train $name ($config)"
    logged "$OUT/$name.train.log" "$PY" train.py --base "$config" --logdir "$OUT/logs" --name "$name" \
        --n_devices 2 --accelerator cpu --max_steps "$STEPS" "$@"
}

export_ckpt() {  # export_ckpt NAME DST [ARGS...]: the newest committed checkpoint of run NAME to DST
    local name=$1 dst=$2
    shift 2
    local step
    step=$(ls -d "$OUT/logs/$name/checkpoints/step-"* | sort | tail -n 1)
    echo "== export $step -> $dst"
    logged "$OUT/ckpts/$(basename "$dst" .safetensors).export.log" "$PY" bin_to_st.py "$step" "$dst" "$@"
    grep -E "^  (EMA|LoRA|verified)" "$OUT/ckpts/$(basename "$dst" .safetensors).export.log"
}

train phase1 configs/tiny/phase1.yaml
export_ckpt phase1 "$OUT/ckpts/phase1.safetensors"

train phase2_stage1 configs/tiny/phase2_stage1.yaml --finetune "$OUT/ckpts/phase1.safetensors"
export_ckpt phase2_stage1 "$OUT/ckpts/phase2_stage1.safetensors" --keep-lora

train phase2_stage2 configs/tiny/phase2_stage2.yaml --finetune "$OUT/ckpts/phase2_stage1.safetensors"
export_ckpt phase2_stage2 "$OUT/ckpts/vista_tiny.safetensors"

echo "== sample from $OUT/ckpts/vista_tiny.safetensors"
logged "$OUT/sample.log" "$PY" sample.py --ckpt "$OUT/ckpts/vista_tiny.safetensors" --dataset TOY \
    --n_samples 1 --n_steps 2 --height 64 --width 128 --action traj --device cpu --save "$OUT/samples"
tail -n 1 "$OUT/sample.log"
echo "== done: $OUT"
