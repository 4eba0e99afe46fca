#!/usr/bin/env bash
# The main job, end to end: set up, audit, train with the default recipe, evaluate, report.
#   scripts/main_job.sh [DATA_ROOT] [RUN_DIR]
# Without DATA_ROOT: ../shared/data/chest_xray_224 (beside this checkout) when it exists,
# else $PNEUMOSCOPE_DATA when set, else the embedded sample data/sample/ (a few minutes on a CPU).
set -euo pipefail
# Paths given by the user are read from where they ran the script, not from the repository.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
ARG_DATA=${1:+$(abspath "$1")}
ARG_RUN=${2:+$(abspath "$2")}
[ -n "${PNEUMOSCOPE_DATA:-}" ] && PNEUMOSCOPE_DATA=$(abspath "$PNEUMOSCOPE_DATA")
cd "$(dirname "$0")/.."
SAMPLE=data/sample
if [ -n "$ARG_DATA" ]; then
  DATA=$ARG_DATA; WHY="given on the command line"
elif [ -d ../shared/data/chest_xray_224/train ]; then
  DATA=../shared/data/chest_xray_224; WHY="found beside this checkout"
elif [ -n "${PNEUMOSCOPE_DATA:-}" ]; then
  DATA=$PNEUMOSCOPE_DATA; WHY="from \$PNEUMOSCOPE_DATA"
else
  DATA=$SAMPLE; WHY="the embedded sample (no ../shared/data/chest_xray_224, no \$PNEUMOSCOPE_DATA)"
fi
# The demo and the full data get run folders of their own, so one never resumes the other.
if [ "$DATA" = "$SAMPLE" ]; then RUN=${ARG_RUN:-runs/sample}; else RUN=${ARG_RUN:-runs/main}; fi
[ -d "$DATA/train" ] || { echo "no data at $DATA ($WHY): pass DATA_ROOT holding train/{NORMAL,PNEUMONIA}" >&2; exit 2; }
echo "data: $DATA — $WHY"
if [ "$DATA" = "$SAMPLE" ]; then
  echo "      (a 433-image demo of real films; for the full data set run" \
       "'.venv/bin/pneumoscope data download --to DIR' and then 'bash scripts/main_job.sh DIR/chest_xray'," \
       "or set PNEUMOSCOPE_DATA to a folder you already have)"
fi
start_job=$(date +%s)
bash scripts/setup_env.sh
PS=.venv/bin/pneumoscope
$PS audit "$DATA"
start=$(date +%s)
RESUME=
if [ -f "$RUN/config.json" ]; then
  # Resume only a run of this very data; another data set's run is never continued.
  # (config.json, not the checkpoint: a run killed before its first checkpoint is resumed
  # too, which starts it over; without --resume train refuses a folder holding a run.)
  RAN_ON=$(.venv/bin/python -c "import json,os,sys; print(os.path.realpath(json.load(open(sys.argv[1]))['data']))" "$RUN/config.json" 2>/dev/null || true)
  if [ "$RAN_ON" = "$(realpath "$DATA")" ]; then
    RESUME=--resume
  else
    echo "$RUN holds a run on ${RAN_ON:-other data}, not on $DATA: pass another RUN_DIR as the second argument" >&2
    exit 2
  fi
fi
$PS train --data "$DATA" --out "$RUN" $RESUME
echo "train wall time: $(( $(date +%s) - start )) s"
# Evaluate on the held-out test split when it is there; otherwise on the official val split
# (16 images: a smoke check, not a result).
EVAL=
for split in test val; do
  if [ -d "$DATA/$split" ]; then
    EVAL="$RUN/metrics_$split.json"
    $PS evaluate "$RUN" --data "$DATA/$split" --out "$EVAL"
    break
  fi
done
# The report on the run's own validation part (patient-grouped, held out of training):
# more images than the official val split, chosen before any training.
$PS report "$RUN" --split val --out "$RUN/report"
echo
echo "main job done in $(( $(date +%s) - start_job )) s on $DATA. Results in $RUN/:"
echo "  summary.json             validation (patient-grouped part of train): ROC AUC, thresholds"
[ -n "$EVAL" ] && echo "  $(basename "$EVAL")        metrics on $DATA/$split (n=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['n'])" "$EVAL"))"
echo "  report/index.html        the report (open it in a browser)"
echo "  model_best.safetensors   the model; 'pneumoscope predict|serve|explain $RUN ...' use it"
