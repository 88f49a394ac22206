#!/usr/bin/env bash
# How the shipped models were made: the project's own `python -m menet_qgis train` on the shared data.
#
#   scripts/train_default_model.sh          menet_coasts_v2.pt, the default (recipe v2: no B12)
#   scripts/train_default_model.sh v1       menet_jambeli_v1.pt, the Jambelí-only model (recipe v1: needs B12)
#
# v2 trains from random weights (no ImageNet weights can be had here) on Jambelí + four MagSet-2 zones:
# validation = v1's 58 Jambelí validation windows + zone 6 (they choose the epoch and the decision
# threshold), zones 3 and 8 held out (never trained on, never used to choose).  30 epochs, one-cycle
# peaking at 1e-3.  Three seeds of this recipe were trained (studies/ablate_coasts.sh scratch,
# scratch1, scratch2) and the one with the best validation F1 ships: SEED below.  Fine-tuning v1's
# weights instead (12 epochs at 3e-4, the previous default) tied on validation and scored lower on the
# held-out coasts (MODEL_CARD).  MagSet-2's GMW labels are used up to their edges: leaving 1 px
# either side out (edge_ignore=1) scored lower on validation (studies/ablate_coasts.sh edge1).
# 30 epochs took 36-41 min on the 2-core CPU machine (idle); a stopped run continues with --resume.
# Then `python -m studies.evaluate_coasts` scores it per zone.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=../shared/data
OUT=resources/models
if [[ ${1:-v2} == v1 ]]; then
  TILES=$SHARED/jambeli/train
  .venv/bin/python -m menet_qgis train --tiles "$TILES" --recipe 1 --out "$OUT/menet_jambeli_v1.pt" --epochs 40 \
      --batch-size 8 --lr 1e-3 --val-fraction 0.2 --seed 0 --history "$OUT/menet_jambeli_v1.history.json"
  .venv/bin/python -m menet_qgis assess --tiles "$TILES" --model "$OUT/menet_jambeli_v1.pt" \
      --table "$OUT/menet_jambeli_v1.validation.csv" --report "$OUT/menet_jambeli_v1.validation.html"
  (cd "$OUT" && sha256sum menet_jambeli_v1.pt > menet_jambeli_v1.pt.sha256)
  exit 0
fi
SEED=1   # validation F1 0.9349 (seeds 0, 2: 0.9334, 0.9344)
.venv/bin/python -m menet_qgis train \
    --tiles "$SHARED/jambeli/train:name=jambeli" \
    --tiles "$SHARED/magset2/tiles:name=magset2,group=tile_(\d+)_" \
    --recipe 2 --val-names-from "$OUT/menet_jambeli_v1.pt" \
    --val-groups magset2:6 --holdout magset2:3,magset2:8 \
    --epochs 30 --batch-size 8 --lr 1e-3 --seed $SEED --device cpu --threads 2 --resume \
    --out "$OUT/menet_coasts_v2.pt" --history "$OUT/menet_coasts_v2.history.json"
.venv/bin/python -m studies.evaluate_coasts "$OUT/menet_coasts_v2.pt" --v1 "$OUT/menet_jambeli_v1.pt" --tta \
    --json "$OUT/menet_coasts_v2.evaluation.json" --markdown "$OUT/menet_coasts_v2.evaluation.md"
(cd "$OUT" && sha256sum menet_coasts_v2.pt > menet_coasts_v2.pt.sha256)
