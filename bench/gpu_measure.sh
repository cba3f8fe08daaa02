#!/usr/bin/env bash
# The open measurements of issue #13 (speed) and #15 (evaluation throughput) on one GPU, each part sized to fit a
# 10-minute command (compilation included), JSON lines under OUT (default bench/results/<date>-<gpu>/):
#   bash bench/gpu_measure.sh train    # training steps with use_checkpoint auto (the configs' compiled layers unless
#                                      # TRAIN_OVERRIDES says otherwise): phase 1 at 576x1024 (and a kernel profile of
#                                      # one step), phase 2 stage 1 at 320x576, batch 1 (kernel and host profiles) and 4
#   bash bench/gpu_measure.sh sample   # 25x576x1024, 50 Euler steps, CFG 2.5: compiled bf16 vs the GroupNorm kernels
#                                      # in the UNet and the VAE (Placement(fused_groupnorm=True)) vs FP8 (--fp8) vs
#                                      # --low_vram (compiled, as sample.py runs it on CUDA), each with the VAE
#                                      # decode again in bf16 (--decode_dtype bf16)
#   bash bench/gpu_measure.sh profile576  # where the phase-1 576x1024 step's time goes: a kernel and a host profile of
#                                      # one eager step (quick: no compilation), then of one compiled step
#   bash bench/gpu_measure.sh zero_step  # the 576x1024 phase-1 step with DeepSpeed's stock optimizer step (its bf16
#                                      # overflow check, per-tensor norm, foreach AdamW: --deepspeed-stock) against
#                                      # vwm's (vwm/training/zero_step.py, fused AdamW), eager (quick), then vwm's
#                                      # compiled; each line has the step's regions (regions_ms)
#   bash bench/gpu_measure.sh groupnorm  # the fused GroupNorm (+ SiLU) kernels (vwm.models.fused_groupnorm) against
#                                      # eager and Inductor at the UNet's and the VAE's shapes, the VAE's 512-wide
#                                      # attention as SDPA against fp32-score matmuls (bench/groupnorm.py), the
#                                      # kernels' GPU tests, then the compiled 576x1024 phase-1 step without and with
#                                      # model.params.fused_groupnorm (the frozen VAE encoders)
#   bash bench/gpu_measure.sh geglu    # the fused GEGLU kernel against the plain projection + gate at a sampling
#                                      # step's shapes (bench/geglu.py, every tile config too), then a rollout
#                                      # compiled without and with it
#   bash bench/gpu_measure.sh eval     # the Vista-protocol evaluation's seconds per clip (compiled UNet)
#   bash bench/gpu_measure.sh compiled_train  # why compiled training failed on an H100 (2026-12-06): the compiled
#                                      # layers' loss forward + backward at 576x1024 (every layer checkpointed) against
#                                      # the eager layers (loss, gradient distance, time), with the checkpoint inside
#                                      # the graph and flash attention, then around the compiled layers in eager code
#   bash bench/gpu_measure.sh unet_profile    # the compiled batch-2 UNet forward of a sampling step, by kernel
#   bash bench/gpu_measure.sh compiled_grads  # which compiled UNet layer computes wrong gradients at 576x1024 (the
#                                      # compiled loss was right and its gradients 1.9e4 off on an H100, 2026-12-07),
#                                      # each distinct layer alone against eager, then a compiler bisection of the
#                                      # first wrong ones (mix-order reduction switched, AOTAutograd graphs run
#                                      # eagerly, fp32, flash attention)
#   bash bench/gpu_measure.sh compile_fix    # the middle block's res block compiled with each Inductor option of
#                                      # compiled_grads.SWEEP against eager, then the 576x1024 training step
#                                      # compiled with the first option set that gave the eager gradients (vwm's
#                                      # own when it does), its compiled-gradient check in the JSON line
# TRAIN_OVERRIDES="a.b=c ..." passes config overrides to the training runs (model.params.compile_model=False: eager).
# Several parts run in order (`bash bench/gpu_measure.sh eval sample`); with BUDGET_S=<seconds> set, no run goes
# past that many seconds from the start, so a batch of parts fits one command's limit (the inductor cache
# makes a part that compiles the same UNet again cheaper than on its own).
# Each run prints its JSON line (device named) as it finishes; a run stopped at its time limit keeps what it printed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_measure.sh train|profile576|zero_step|groupnorm|sample|geglu|eval|compiled_train|unet_profile|compiled_grads|compile_fix [more parts]" >&2; exit 2; }
for part in "$@"; do
  case $part in
    train|profile576|zero_step|groupnorm|sample|geglu|eval|compiled_train|unet_profile|compiled_grads|compile_fix) ;;
    *) echo "unknown part $part; allowed: train, profile576, zero_step, groupnorm, sample, geglu, eval, compiled_train, unet_profile, compiled_grads, compile_fix" >&2
       exit 2 ;;
  esac
done
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
OUT=${OUT:-bench/results/$(date +%F)-${GPU}}
mkdir -p "$OUT"
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
start=$(date +%s)
# cap T: T seconds, or fewer where BUDGET_S leaves fewer (at least 1)
cap() {
  local t=$1
  if [ -n "${BUDGET_S:-}" ]; then
    local r=$(( BUDGET_S - ($(date +%s) - start) ))
    [ "$r" -lt "$t" ] && t=$r
  fi
  [ "$t" -lt 1 ] && t=1
  echo "$t"
}
for PART in "$@"; do
  t0=$(date +%s)
  left() { cap $(( $1 - ($(date +%s) - t0) )); }  # seconds left of the part's own budget, within BUDGET_S
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /' >>"$OUT/$PART.log"
  case $PART in
    train)
      timeout -k 15 "$(cap 250)" "$PY" bench/train_step.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --checkpointing auto --steps 8 --warmup 3 --profile "$OUT/train576_profile.txt" \
        $TRAIN_OVERRIDES 2>>"$OUT/$PART.log" | tee -a "$OUT/train.jsonl"
      timeout -k 15 "$(cap 150)" "$PY" bench/train_step.py --config configs/training/vista_phase2_stage1.yaml --height 320 \
        --width 576 --checkpointing auto --steps 10 --warmup 3 --profile "$OUT/train320_profile.txt" \
        --host-profile "$OUT/train320_host.txt" $TRAIN_OVERRIDES 2>>"$OUT/$PART.log" | tee -a "$OUT/train.jsonl"
      timeout -k 15 "$(left 560)" "$PY" bench/train_step.py --config configs/training/vista_phase2_stage1.yaml --height 320 \
        --width 576 --checkpointing auto --batch 4 --steps 6 --warmup 2 $TRAIN_OVERRIDES 2>>"$OUT/$PART.log" \
        | tee -a "$OUT/train.jsonl" ;;
    zero_step)
      for stock in --deepspeed-stock ""; do
        timeout -k 15 "$(cap 110)" "$PY" bench/train_step.py --config configs/training/vista_phase1.yaml --height 576 \
          --width 1024 --checkpointing auto --steps 4 --warmup 2 $stock model.params.compile_model=False \
          2>>"$OUT/$PART.log" | tee -a "$OUT/zero_step.jsonl"
      done
      timeout -k 15 "$(left 560)" "$PY" bench/train_step.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --checkpointing auto --steps 5 --warmup 3 $TRAIN_OVERRIDES 2>>"$OUT/$PART.log" \
        | tee -a "$OUT/zero_step.jsonl" ;;
    groupnorm)
      timeout -k 15 "$(cap 150)" "$PY" bench/groupnorm.py 2>>"$OUT/$PART.log" | tee -a "$OUT/groupnorm.jsonl"
      timeout -k 15 "$(cap 120)" "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_groupnorm.py \
        2>&1 | tail -5 | tee -a "$OUT/$PART.log"
      # the compiled step without and with the kernels in the frozen VAE encoders (the second compilation finds
      # the UNet's graphs in the inductor cache)
      for fused in False True; do
        timeout -k 15 "$(left 560)" "$PY" bench/train_step.py --config configs/training/vista_phase1.yaml --height 576 \
          --width 1024 --checkpointing auto --steps 4 --warmup 3 model.params.fused_groupnorm=$fused \
          $TRAIN_OVERRIDES 2>>"$OUT/$PART.log" | tee -a "$OUT/groupnorm_train.jsonl"
      done ;;
    sample)
      timeout -k 15 "$(cap 560)" "$PY" bench/sample.py --modes compiled fused_gn fp8 low_vram --decode_bf16 \
        2>>"$OUT/$PART.log" \
        | tee -a "$OUT/sample.jsonl" ;;
    profile576)
      timeout -k 15 "$(cap 170)" "$PY" bench/train_step.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --checkpointing auto --steps 3 --warmup 3 --profile "$OUT/train576_eager_profile.txt" \
        --host-profile "$OUT/train576_eager_host.txt" model.params.compile_model=False 2>>"$OUT/$PART.log" \
        | tee -a "$OUT/train.jsonl"
      timeout -k 15 "$(left 560)" "$PY" bench/train_step.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --checkpointing auto --steps 3 --warmup 3 --profile "$OUT/train576_compiled_profile.txt" \
        --host-profile "$OUT/train576_compiled_host.txt" $TRAIN_OVERRIDES 2>>"$OUT/$PART.log" \
        | tee -a "$OUT/train.jsonl" ;;
    geglu)
      timeout -k 15 "$(cap 150)" "$PY" bench/geglu.py --sweep 2>>"$OUT/$PART.log" | tee -a "$OUT/geglu.jsonl"
      timeout -k 15 "$(left 560)" "$PY" bench/sample.py --modes compiled fused --decode_bf16 2>>"$OUT/$PART.log" \
        | tee -a "$OUT/sample.jsonl" ;;
    eval)
      timeout -k 15 "$(cap 560)" "$PY" bench/evaluate.py --clips 3 --compile --metrics fid fvd 2>>"$OUT/$PART.log" \
        | tee -a "$OUT/evaluate.jsonl" ;;
    compiled_train)
      # the compiled layers against the eager ones (loss, gradient distance, time of the loss forward + backward
      # at 576x1024, every layer checkpointed): the default placement (checkpoint inside the compiled graph, which
      # failed on an H100 on 2026-12-06) with the flash attention backend instead of cuDNN, then the checkpoint
      # in eager code around the compiled layers with the default backend
      timeout -k 15 "$(cap 260)" "$PY" bench/regions.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --regions loss --reps 2 --top 0 --checkpointing on --compile --checkpoint-in graph \
        --compare-eager --sdpa flash 2>>"$OUT/$PART.log" | tee -a "$OUT/compiled_train.jsonl"
      timeout -k 15 "$(left 560)" "$PY" bench/regions.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --regions loss --reps 2 --top 0 --checkpointing on --compile --checkpoint-in eager \
        --compare-eager --sdpa default 2>>"$OUT/$PART.log" | tee -a "$OUT/compiled_train.jsonl" ;;
    unet_profile)
      # where the compiled sampling step's time goes: one batch-2 (CFG) UNet forward, the 40 costliest kernels
      timeout -k 15 "$(cap 240)" "$PY" bench/regions.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --regions unet_fwd --compile --sdpa default --top 40 2>>"$OUT/$PART.log" \
        | tee -a "$OUT/unet_profile.jsonl" ;;
    compile_fix)
      timeout -k 15 "$(cap 230)" "$PY" bench/compiled_grads.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --modes plain --only "VideoResBlock(25, 1280, 9, 16)" --sweep --budget-s "$(cap 210)" \
        2>>"$OUT/$PART.log" | tee -a "$OUT/compile_sweep.jsonl"
      OPTS=$("$PY" -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ok = [r["variant"] for r in rows if r.get("check") == "sweep" and r.get("ok")]
print(json.dumps(ok[0] if ok else {}, separators=(",", ":")))' "$OUT/compile_sweep.jsonl")
      echo "compile_fix: compile_options=$OPTS" | tee -a "$OUT/$PART.log"
      timeout -k 15 "$(left 560)" "$PY" bench/train_step.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --checkpointing auto --steps 8 --warmup 3 model.params.compile_model=True \
        "model.params.compile_options=$OPTS" 2>>"$OUT/$PART.log" | tee -a "$OUT/train.jsonl" ;;
    compiled_grads)
      timeout -k 15 "$(cap 560)" "$PY" bench/compiled_grads.py --config configs/training/vista_phase1.yaml --height 576 \
        --width 1024 --modes plain ckpt_graph --bisect 2 --budget-s "$(cap 500)" 2>>"$OUT/$PART.log" \
        | tee -a "$OUT/compiled_grads.jsonl" ;;
  esac
  echo "{\"part\": \"$PART\", \"seconds\": $(( $(date +%s) - t0 )), \"out\": \"$OUT\"}"
done
