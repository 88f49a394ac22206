#!/usr/bin/env bash
# How resources/models/menet_jambeli_v1.pt was made: the project's own code on the
# real Jambelí tiles, then scored on its own validation windows next to the
# MVI and random-forest baselines.  Takes ~1 h on the 2-core CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
TILES=../shared/data/jambeli/train
OUT=resources/models
.venv/bin/python -m menet_qgis train --tiles "$TILES" --out "$OUT/menet_jambeli_v1.pt" --epochs 40 \
    --batch-size 8 --lr 1e-3 --val-fraction 0.2 --seed 0 --history "$OUT/menet_jambeli_v1.history.json"
.venv/bin/python -m menet_qgis assess --tiles "$TILES" --model "$OUT/menet_jambeli_v1.pt" \
    --table "$OUT/menet_jambeli_v1.validation.csv" --report "$OUT/menet_jambeli_v1.validation.html"
(cd "$OUT" && sha256sum menet_jambeli_v1.pt > menet_jambeli_v1.pt.sha256)
