#!/usr/bin/env bash
# The honest folds of issue 28 (studies/honest_folds.py) at full length, for a GPU machine.
#
#   scripts/train_folds_gpu.sh                 every arm and fold at 30 epochs (the shipped recipe's length)
#   scripts/train_folds_gpu.sh mixed:0 b12:0   only these runs (ARM:FOLD), e.g. to fit a 10-minute slot
#   EPOCHS=6 scripts/train_folds_gpu.sh        the CPU-sized proxy the tables in docs/ were made with
#
# Training runs in bf16 autocast on CUDA (train.py), fp32 on the CPU.  Each run writes
# build/folds/ARM.eEPOCHS.s0.foldK.{json,pt,log}; runs already written are skipped, so a stopped
# script continues where it was.  Reads the shared data from ../shared/data, or from MENET_SHARED_DATA.
# A device session's 10-minute command holds only some of the 15 runs: name them (ARM:FOLD); the styles arm runs by name only.
# At the end, the tables (markdown) and the seconds per epoch of each run (nvidia-smi's name in the log).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EPOCHS=${EPOCHS:-30}
RUNS=("$@")
if [[ ${#RUNS[@]} -eq 0 ]]; then
  for k in 0 1 2 3 4 5 6; do RUNS+=("mixed:$k"); done
  for arm in b12 jambeli; do for k in 0 1 2 3; do RUNS+=("$arm:$k"); done; done
fi
mkdir -p build/folds
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee build/folds/gpu.txt
for run in "${RUNS[@]}"; do
  arm=${run%%:*} fold=${run##*:}
  [[ -f build/folds/$arm.e$EPOCHS.s0.fold$fold.json ]] && continue
  echo "=== $arm fold $fold, $EPOCHS epochs, $(date +%T)"
  "$PY" -m studies.honest_folds run "$arm" "$fold" --epochs "$EPOCHS" > "build/folds/$arm.e$EPOCHS.fold$fold.log" 2>&1
  grep -h "^epoch " "build/folds/$arm.e$EPOCHS.fold$fold.log" | tail -1
done
"$PY" -m studies.honest_folds table --epochs "$EPOCHS" | tee "build/folds/table.e$EPOCHS.md"
