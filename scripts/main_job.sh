#!/usr/bin/env bash
# The main job, end to end: set up, audit, train with the default recipe, evaluate.
#   scripts/main_job.sh [DATA_ROOT] [RUN_DIR]
# DATA_ROOT defaults to ../shared/data/chest_xray_224 (beside this checkout) when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/chest_xray_224}
RUN=${2:-runs/main}
[ -d "$DATA/train" ] || { echo "no data at $DATA: pass DATA_ROOT holding train/{NORMAL,PNEUMONIA}" >&2; exit 2; }
bash scripts/setup_env.sh
PS=.venv/bin/pneumoscope
$PS audit "$DATA"
start=$(date +%s)
if [ -f "$RUN/checkpoint_last.pt" ]; then RESUME=--resume; else RESUME=; fi
$PS train --data "$DATA" --out "$RUN" $RESUME
echo "train wall time: $(( $(date +%s) - start )) s"
# Evaluate on the held-out test split when it is there; otherwise on the official val split
# (16 images: a smoke check, not a result).
for split in test val; do
  if [ -d "$DATA/$split" ]; then
    $PS evaluate "$RUN" --data "$DATA/$split" --out "$RUN/metrics_$split.json"
    break
  fi
done
echo "validation (patient-grouped part of train) summary: $RUN/summary.json"
