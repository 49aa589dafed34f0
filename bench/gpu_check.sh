#!/usr/bin/env bash
# GPU check in under 10 minutes: a short bf16 + channels_last training run through single_gpu.py
# (loss, evaluation, snapshot resume), then ResNet-50 training and inference throughput at 224 and
# 448 px, eager and compiled, and the ViT-S/16 and ViT-B/16 of the foundation recipes at 224 px
# with the hours each recipe would take (see bench/gpu_check.py). Results go to stdout and to $OUT when set
# (else runs/gpu_check): gpu_check.json, gpu_check.log, nvidia-smi.txt, smoke/ (launcher logs).
#
#   bash bench/gpu_check.sh [extra bench/gpu_check.py flags]
#
# Exit status: that of gpu_check.py (0 all sections ran, 1 a section failed), 124 when the hard
# time limit stopped it (the sections finished by then are in gpu_check.json).
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
# The Python budget leaves room for interpreter start-up and the summary inside the hard limit.
budget_s="${GPU_CHECK_BUDGET_S:-540}"
limit_s="${GPU_CHECK_LIMIT_S:-570}"

{ nvidia-smi || echo "nvidia-smi not available"; } > "$out/nvidia-smi.txt" 2>&1
timeout --kill-after=10 "$limit_s" \
    python -u bench/gpu_check.py --budget_s "$budget_s" --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
status="${PIPESTATUS[0]}"
if [ "$status" = 124 ]; then
    echo "gpu_check: stopped by the ${limit_s} s limit; finished sections are in $out/gpu_check.json"
fi
exit "$status"
