#!/usr/bin/env bash
# One ablation: the fine-tuning recipe (the default model until the random start replaced it: v1's
# weights, 12 epochs at 3e-4, same split as scripts/train_default_model.sh) with one change, then the
# per-zone table; `scratchN` is the shipped default's recipe.  Models go to build/ablation/ (not
# shipped); the ablation tables of docs/experiments/ come from their .evaluation.md files.
#
#   studies/ablate_coasts.sh edge1     1 px either side of MagSet-2's label edges left out of the loss
#                                      (the first v2 model's setting; the default uses the labels up to their edges)
#   studies/ablate_coasts.sh jambeliN  Jambelí windows count N times in the loss (weight=N; jambeli2, jambeli4)
#   studies/ablate_coasts.sh boundary2 boundary-aware loss: pixels within 2 px of a label edge count 3x
#   studies/ablate_coasts.sh refine16  the full-resolution image-guided refinement, 16 channels
#   studies/ablate_coasts.sh align3    MagSet-2's labels moved onto their images (up to 3 px) for training
#   studies/ablate_coasts.sh seedN     no change but the random seed (N): how far runs of one recipe spread
#   studies/ablate_coasts.sh epochs24  twice the epochs (the one-cycle schedule stretched to 24)
#   studies/ablate_coasts.sh scratchN  from random weights instead of the Jambelí model's: 30 epochs,
#                                      peak learning rate 1e-3 (as the Jambelí model was trained), seed N
#                                      (scratch = seed 0)
#   studies/ablate_coasts.sh jambelionly  Jambelí windows only (no MagSet-2): what B12 and sharing the
#                                      network with other coasts cost on Jambelí
#   studies/ablate_coasts.sh styles    MagSet-2's GMW labels train an output of their own (label style 1);
#                                      the saved model keeps Jambelí's hand-drawn style (style 0)
#   studies/ablate_coasts.sh fromdefault  start from the shipped default (menet_coasts_v2.pt) instead of v1;
#                                      `fromdefault+jambelionly` is a Jambelí specialist of the default
#
# Variants combine with `+`: `scratch1+jambeli2` is the default's recipe and seed with Jambelí
# counted twice.
#
# A second argument holds out other MagSet-2 zones instead of 3 and 8 (e.g. `scratch 0,5` trains on
# zones 1, 2, 3, 8, validates on 6 as always, and writes build/ablation/scratch.holdout05.*): the same
# comparison on coasts that were never used to choose a recipe.
#
# Every variant is also scored against MagSet-2 labels moved onto their images (.aligned.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=../shared/data
OUT=build/ablation
mkdir -p "$OUT"
VARIANT=${1:?usage: studies/ablate_coasts.sh edge1|jambeliN|boundary2|refine16|align3|epochs24|scratchN|jambelionly|fromdefault|styles|seedN[+...] [HOLDOUT_ZONES]}
HOLDOUT_ZONES=${2:-3,8}
NAME=$VARIANT
MAGSET2="$SHARED/magset2/tiles:name=magset2,group=tile_(\d+)_"
JAMBELI="$SHARED/jambeli/train:name=jambeli"
EXTRA=()
EPOCHS=12
LR=3e-4
INIT=(--init resources/models/menet_jambeli_v1.pt)
SPLIT=(--val-groups magset2:6 --holdout "magset2:${HOLDOUT_ZONES//,/,magset2:}")
[[ $HOLDOUT_ZONES == 3,8 ]] || NAME=$VARIANT.holdout${HOLDOUT_ZONES//,/}
for PART in ${VARIANT//+/ }; do
  case $PART in
    edge1) MAGSET2="$SHARED/magset2/tiles:name=magset2,edge_ignore=1,group=tile_(\d+)_" ;;
    styles) MAGSET2="$SHARED/magset2/tiles:name=magset2,style=1,group=tile_(\d+)_" ;;
    boundary2) EXTRA+=(--boundary-weight 2) ;;
    refine16) EXTRA+=(--refine-width 16) ;;
    epochs24) EPOCHS=24 ;;
    jambelionly) MAGSET2=""; SPLIT=() ;;
    fromdefault) INIT=(--init resources/models/menet_coasts_v2.pt) ;;
    scratch*) INIT=(); EPOCHS=30; LR=1e-3; SEED=${PART#scratch}; EXTRA+=(--seed "${SEED:-0}") ;;
    jambeli[0-9]*) JAMBELI="$SHARED/jambeli/train:name=jambeli,weight=${PART#jambeli}" ;;
    seed[0-9]*) EXTRA+=(--seed "${PART#seed}") ;;
    align3) MAGSET2="$SHARED/magset2/tiles:name=magset2,align=3,group=tile_(\d+)_" ;;
    *) echo "unknown variant $PART" >&2; exit 2 ;;
  esac
done
.venv/bin/python -m menet_qgis train --tiles "$JAMBELI" ${MAGSET2:+--tiles "$MAGSET2"} \
    --recipe 2 "${INIT[@]}" --val-names-from resources/models/menet_jambeli_v1.pt \
    "${SPLIT[@]}" \
    --epochs $EPOCHS --batch-size 8 --lr $LR --seed 0 --device cpu --threads 2 --resume "${EXTRA[@]}" \
    --out "$OUT/$NAME.pt" --history "$OUT/$NAME.history.json"
.venv/bin/python -m studies.evaluate_coasts "$OUT/$NAME.pt" \
    --json "$OUT/$NAME.evaluation.json" --markdown "$OUT/$NAME.evaluation.md"
.venv/bin/python -m studies.evaluate_coasts "$OUT/$NAME.pt" --align 3 \
    --json "$OUT/$NAME.aligned.json" --markdown "$OUT/$NAME.aligned.md"
