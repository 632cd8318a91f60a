#!/usr/bin/env bash
# A trained ResNet50 BNNeck at 256x128 (the model of issue 13's benchmark) for the
# accuracy columns of scripts/bench_extract.py --accuracy and of `export --int8`'s
# metric check: trained from scratch (pretrained=none: no ImageNet weights here) on
# CUHK03-labeled for a fixed number of steps, evaluated on query/ vs bounding_box_test/
# at the end (R1/mAP in the last lines of the output and in OUT/train.log).
#
#   scripts/train_bench_checkpoint.sh                  # ~60 steps: roughly 10 min on 2 idle AVX512_BF16 cores
#   STEPS=30 EPOCHS=12 scripts/train_bench_checkpoint.sh   # 360 steps, about an hour: further from chance
#   STEPS=1 EPOCHS=1 P=4 K=2 OUT=/tmp/smoke scripts/train_bench_checkpoint.sh   # does it run (minutes)
#
# then, for example:
#   uv run --frozen --extra cpu --group bench python scripts/bench_extract.py --checkpoint OUT/model.pt \
#       --data ../shared/data/cuhk03-labeled --accuracy
#   reid-search export --model OUT/model.pt --int8 --calibrate ../shared/data/cuhk03-labeled --out r50-int8.onnx
#
# Honest expectations: from scratch, a few dozen to a few hundred steps of ResNet50
# leave the model weak (chance on this split: R1 ~0.5%, mAP ~1.5%; a resnet18 at 128x64
# reached mAP ~5% after 100 steps, BENCHMARKS.md). With 200 queries one query is 0.5
# R1 points, so fp32-vs-bf16-vs-int8 deltas of a few tenths are within noise.
#
# Choices: P16xK4 (the paper's batch), lr 1e-3 (from scratch it learns faster than the
# paper's 3.5e-4 in short runs, see train_cuhk03.sh), warmup of ~1/12 of the run, x0.1 at
# 70% and 90% of it; AMP=bf16 by default (the CPU's native bfloat16, AVX512_BF16/AMX;
# AMP=off trains in fp32 on CPUs without it). Everything else is the default recipe.
set -euo pipefail

cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cuhk03-labeled}
OUT=${OUT:-reid-workspace/runs/bench-r50-256x128}
EPOCHS=${EPOCHS:-4}
STEPS=${STEPS:-15}          # steps per epoch
P=${P:-16}
K=${K:-4}
LR=${LR:-1e-3}
AMP=${AMP:-bf16}
SEED=${SEED:-0}
WORKERS=${WORKERS:-1}
WARMUP=${WARMUP:-$(( (EPOCHS + 6) / 12 ))}
M1=$(( (EPOCHS * 7 + 5) / 10 )); M2=$(( (EPOCHS * 9 + 5) / 10 ))
(( M1 >= 1 )) || M1=1; (( M2 > M1 )) || M2=$(( M1 + 1 ))
MILESTONES=${MILESTONES:-$M1,$M2}

if [ ! -d "$DATA/bounding_box_train" ]; then
    echo "no CUHK03 data at $DATA (expected $DATA/bounding_box_train); set DATA=..." >&2
    exit 1
fi
if [ -x .venv/bin/reid-search ]; then
    REID=(.venv/bin/reid-search)
else
    REID=(python3 scripts/dev.py run reid-search)
fi

OPTS=(
    -o arch=resnet50 -o pretrained=none -o height=256 -o width=128 -o pad=10
    -o num_identities="$P" -o num_instances="$K" -o lr="$LR" -o amp="$AMP"
    -o epochs="$EPOCHS" -o max_steps_per_epoch="$STEPS" -o warmup_epochs="$WARMUP" -o milestones="$MILESTONES"
    -o eval_period="$EPOCHS" -o save_period="$EPOCHS" -o log_period=5 -o num_workers="$WORKERS" -o seed="$SEED"
)
echo "data: $DATA   run: $OUT"
echo "resnet50 BNNeck 256x128 from scratch: $EPOCHS epochs x $STEPS steps of P${P}xK${K}, lr $LR, amp $AMP," \
     "warmup $WARMUP, x0.1 at epochs $MILESTONES; evaluated at the end"
echo "command: ${REID[*]} train --data $DATA --output $OUT ${OPTS[*]}"
START=$SECONDS
"${REID[@]}" train --data "$DATA" --output "$OUT" "${OPTS[@]}"
ELAPSED=$(( SECONDS - START ))
echo "checkpoint: $OUT/model.pt"
echo "wall time: $(( ELAPSED / 60 )) min $(( ELAPSED % 60 )) s"
