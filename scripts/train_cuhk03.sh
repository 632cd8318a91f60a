#!/usr/bin/env bash
# Reduced-schedule strong baseline on real data (CUHK03-labeled in Market layout),
# from scratch (no ImageNet weights), sized for <= 30 minutes on 2 CPU cores.
#
# It prints the untrained model's R1/mAP on the query/gallery split first (the
# run's own initial weights), then trains, evaluating halfway and at the end, so
# the numbers sit side by side. The last line is the wall time.
#
#   scripts/train_cuhk03.sh                       # ../shared/data/cuhk03-labeled -> reid-workspace/runs/cuhk03-reduced
#   DATA=/path/to/cuhk03-labeled OUT=/tmp/run scripts/train_cuhk03.sh
#   HEIGHT=64 WIDTH=32 EPOCHS=2 STEPS=40 WARMUP=0 MILESTONES=10 OUT=/tmp/smoke scripts/train_cuhk03.sh
#                                                 # smoke test: a few minutes, mAP already moves
#
# Choices (measured on a 2-core Xeon @ 2.8 GHz shared with other jobs):
# - ResNet18 at 128x64 (the crops' own 64x128 size), P16xK4 = 64 images a step:
#   2.7 s of CPU time per step single-threaded, so about 1.6-2.3 s a step on 2 quiet
#   cores. 20 "epochs" of 30 steps (600 steps, ~5 passes over the 7,239 images)
#   take 16-23 min, plus ~1 min for the three evaluations and start-up.
# - Schedule: warmup keeps the paper's proportion (10 of 120 epochs -> 2 of 20).
#   The lr decays late (x0.1 at 70% and 90% of the run) instead of at the paper's
#   1/3 and 7/12: those are for ImageNet-initialised weights, while from scratch the
#   net is still far from converged a third of the way in (at 64x32, 240 steps at a
#   constant lr 1e-3 took R1 from 0.5% to 9.6% and mAP from 1.3% to 13.9%, still
#   rising linearly). MILESTONES=7,12 gives the proportional schedule instead.
# - Adam lr 1e-3 instead of 3.5e-4: from scratch it learned faster in a short run
#   (80 steps: mAP 4.8% vs 3.0%). LR=3.5e-4 restores the paper's value.
# - Crop padding scaled to the input width (10 px at 128 -> 5 at 64). Every other
#   trick stays as in the default recipe (softmax_triplet_with_center).
set -euo pipefail

cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cuhk03-labeled}
OUT=${OUT:-reid-workspace/runs/cuhk03-reduced}
ARCH=${ARCH:-resnet18}
HEIGHT=${HEIGHT:-128}
WIDTH=${WIDTH:-64}
PAD=$(( (10 * WIDTH + 64) / 128 ))  # the paper's 10 px at width 128, scaled
EPOCHS=${EPOCHS:-20}
STEPS=${STEPS:-30}
LR=${LR:-1e-3}
SEED=${SEED:-0}
WARMUP=${WARMUP:-$(( (EPOCHS * 10 + 60) / 120 ))}
M1=$(( (EPOCHS * 7 + 5) / 10 )); M2=$(( (EPOCHS * 9 + 5) / 10 )); (( M2 > M1 )) || M2=$(( M1 + 1 ))
MILESTONES=${MILESTONES:-$M1,$M2}
HALF=$(( EPOCHS / 2 > 0 ? EPOCHS / 2 : 1 ))

if [ ! -d "$DATA/bounding_box_train" ]; then
    echo "no CUHK03 data at $DATA (expected $DATA/bounding_box_train); set DATA=..." >&2
    exit 1
fi

OPTS=(
    -o arch="$ARCH" -o height="$HEIGHT" -o width="$WIDTH" -o pad="$PAD"
    -o lr="$LR" -o epochs="$EPOCHS" -o max_steps_per_epoch="$STEPS"
    -o warmup_epochs="$WARMUP" -o milestones="$MILESTONES"
    -o eval_period="$HALF" -o save_period="$EPOCHS" -o log_period=10
    -o num_workers=1 -o seed="$SEED"
)
echo "data: $DATA   run: $OUT"
echo "schedule: $EPOCHS epochs x $STEPS steps of P16xK4, lr $LR, warmup $WARMUP epochs, x0.1 at epochs $MILESTONES, eval every $HALF"
echo "command: uv run reid-search train --data $DATA --output $OUT ${OPTS[*]}"
START=$SECONDS

# The untrained model: the run's own initial weights (same config and seed).
uv run python - "$DATA" "${OPTS[@]}" <<'EOF'
import sys
import time

import torch

from reid_search.data import load_market
from reid_search.model import build_model
from trainer.config import resolve_config
from trainer.train import evaluate, preprocess_of

data, opts = sys.argv[1], [a for a in sys.argv[2:] if a != "-o"]
cfg = resolve_config(overrides=opts)
ds = load_market(data)
# trainer.train.main seeds like this before building the model; the classifier,
# which retrieval does not use, is drawn after the backbone and the BNNeck.
torch.manual_seed(cfg.seed)
model = build_model(cfg.arch, 0, cfg.last_stride, cfg.neck, cfg.pretrained, cfg.neck_feat)
t0 = time.perf_counter()
m = evaluate(model, ds.query, ds.gallery, preprocess_of(cfg), torch.device("cpu"), cfg.eval_batch_size)
print(f"untrained: R1 {100 * m['rank1']:.2f}%  R5 {100 * m['rank5']:.2f}%  R10 {100 * m['rank10']:.2f}%  "
      f"mAP {100 * m['mAP']:.2f}%  mINP {100 * m['mINP']:.2f}%   ({len(ds.query)} queries, "
      f"{len(ds.gallery)} gallery images, {time.perf_counter() - t0:.0f} s)", flush=True)
EOF

uv run reid-search train --data "$DATA" --output "$OUT" "${OPTS[@]}"
ELAPSED=$(( SECONDS - START ))
echo "wall time: $(( ELAPSED / 60 )) min $(( ELAPSED % 60 )) s"
